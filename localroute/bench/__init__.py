"""Serving benchmark: `localroute bench` (load generator, managed servers, metrics, report)."""

from localroute.bench.runner import BenchConfig, load_prompts, run_bench

__all__ = ["BenchConfig", "load_prompts", "run_bench"]
