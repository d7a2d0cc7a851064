"""Monitoring: what each request cost and how it was routed, over time.

`record` (the per-request event observers consume), `telemetry` (NVML, CPU), `pricing` and `cost`
(frontier prices, hardware cost per token), `prometheus` (/metrics), `routing_log` (the SQLite/
PostgreSQL log writer), `log_report` (its reader and summaries), `feedback` (scores against rows).
"""
