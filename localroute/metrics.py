"""Prometheus metrics (`/metrics`), all prefixed `localroute_`.

Each app gets its own CollectorRegistry, so several apps in one process (tests, embedding) never
collide. Request metrics are updated by an observer of finished requests; queue depth and GPU
gauges are read live at scrape time from the backends' `health()` and the telemetry sampler.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from localroute.cost import CostAccountant, RequestCost
from localroute.routing_log import RoutingLog
from localroute.telemetry import Nvml, Telemetry

if TYPE_CHECKING:
    from localroute.routing.base import Decision, Tier
    from localroute.server.app import RequestRecord
    from localroute.settings import Settings
    from localroute.types import Generation

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "Monitoring"]

# Confidence is a log-probability aggregate (<= 0) for most aggregators, a probability for others.
CONFIDENCE_BUCKETS = (-10.0, -5.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.3, -0.2, -0.1, -0.05, 0.0,
                      0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def outcome(rec: RequestRecord) -> str:
    if rec.disconnected:
        return "disconnected"
    if rec.status_code != 200:
        return "error"
    if rec.decision is not None and rec.decision.degraded:
        return "degraded"
    return "ok"


class _LiveCollector(Collector):
    """Values read at scrape time: engine queues and GPU telemetry."""

    def __init__(self, tiers: Callable[[], Sequence[Tier]], telemetry: Telemetry | None) -> None:
        self._tiers = tiers
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("localroute_queue_depth", "Sequences in a local tier's engine, by state.",
                                  labels=["tier", "state"])
        for tier in self._tiers():
            if not tier.backend.is_local:
                continue
            try:
                h = tier.backend.health()
            except Exception:
                continue
            for state in ("active", "waiting"):
                if isinstance(h.get(state), int | float):
                    queue.add_metric([tier.name, state], float(h[state]))
        yield queue
        gpus = self._telemetry.gpus() if self._telemetry is not None else []
        util = GaugeMetricFamily("localroute_gpu_utilization_ratio", "GPU busy share over NVML's last period.",
                                 labels=["gpu"])
        mem = GaugeMetricFamily("localroute_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        power = GaugeMetricFamily("localroute_gpu_power_watts", "GPU power draw.", labels=["gpu"])
        energy = CounterMetricFamily("localroute_gpu_energy_joules", "GPU energy since driver load (NVML).",
                                     labels=["gpu"])
        for g in gpus:
            label = [str(g.index)]
            if g.utilization_ratio is not None:
                util.add_metric(label, g.utilization_ratio)
            if g.memory_used_bytes is not None:
                mem.add_metric(label, float(g.memory_used_bytes))
            if g.power_w is not None:
                power.add_metric(label, g.power_w)
            if g.energy_j is not None:
                energy.add_metric(label, g.energy_j)
        yield from (util, mem, power, energy)


class Metrics:
    """The app's metrics; `observe` is a Service observer."""

    def __init__(self, tiers: Callable[[], Sequence[Tier]] = lambda: (), telemetry: Telemetry | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("localroute_requests", "Finished requests by policy, answering tier and outcome.",
                                ["policy", "tier", "outcome"], registry=r)
        self.escalations = Counter("localroute_escalations", "Hand-offs from one tier to the next.",
                                   ["from_tier", "to_tier"], registry=r)
        self.tokens = Counter("localroute_tokens", "Tokens processed per tier (every attempt).",
                              ["tier", "type"], registry=r)
        self.cost = Counter("localroute_cost_usd", "What the answers cost, per tier (every attempt).",
                            ["tier"], registry=r)
        self.counterfactual = Counter("localroute_counterfactual_cost_usd",
                                      "Estimated cost of the same answers on the top (frontier) tier alone.",
                                      registry=r)
        self.confidence = Histogram("localroute_confidence", "Confidence of each tier's answers.", ["tier"],
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.ttft = Histogram("localroute_ttft_seconds", "Time to first token (streams) or to the answer.",
                              ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("localroute_e2e_latency_seconds", "Request latency, arrival to last byte.",
                             ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(_LiveCollector(tiers, telemetry))

    def __call__(self, rec: RequestRecord) -> None:
        self.observe(rec)

    def observe(self, rec: RequestRecord) -> None:
        decision = rec.decision
        tier = (decision.answered_by if decision is not None else "") or "none"
        self.requests.labels(rec.policy, tier, outcome(rec)).inc()
        self.e2e.labels(tier).observe(max(rec.latency_s, 0.0))
        ttft = rec.ttft_s if rec.ttft_s is not None else (rec.latency_s if rec.status_code == 200 else None)
        if ttft is not None:
            self.ttft.labels(tier).observe(max(ttft, 0.0))
        if decision is not None:
            attempts = decision.attempts
            for prev, nxt in itertools.pairwise(attempts):
                self.escalations.labels(prev.tier, nxt.tier).inc()
            for a in attempts:
                self.tokens.labels(a.tier, "input").inc(a.prompt_tokens)
                self.tokens.labels(a.tier, "output").inc(a.completion_tokens)
                if a.confidence is not None and not math.isnan(a.confidence):
                    self.confidence.labels(a.tier).observe(max(a.confidence, -1e9))
        cost: RequestCost | None = rec.extra.get("cost")
        if cost is not None:
            for ac in cost.attempts:
                self.cost.labels(ac.tier).inc(max(ac.cost_usd, 0.0))
            if cost.counterfactual_cost_usd is not None:
                self.counterfactual.inc(max(cost.counterfactual_cost_usd, 0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Monitoring:
    """Everything that watches a running Service: the telemetry sampler, the cost accountant, the
    Prometheus metrics and (when `routing_log_path` is set) the routing log. Built in the app's
    lifespan; `close()` stops the sampler and drains the log."""

    def __init__(self, settings: Settings, tiers: Sequence[Tier], nvml: Nvml | None = None) -> None:
        self.telemetry = Telemetry(settings.telemetry_interval_s, nvml=nvml)
        self.costs = CostAccountant(settings, tiers, self.telemetry)
        self.telemetry.load = self.costs.load
        tier_list = list(tiers)
        self.metrics = Metrics(lambda: tier_list, self.telemetry)
        self.routing_log: RoutingLog | None = None
        if settings.routing_log_path is not None:
            self.routing_log = RoutingLog(settings.routing_log_path, settings.routing_log_retention_days,
                                          settings.log_prompts, self.telemetry)
        self.telemetry.start()

    @property
    def observers(self) -> list[Callable[[RequestRecord], None]]:
        out: list[Callable[[RequestRecord], None]] = [self.metrics.observe]
        if self.routing_log is not None:
            out.append(self.routing_log.observe)
        return out

    def price(self, decision: Decision, generation: Generation | None, started: float) -> RequestCost | None:
        """The request's cost, or None if pricing itself failed (logged; the answer still goes out)."""
        try:
            return self.costs.price(decision, generation, started, time.perf_counter())
        except Exception:
            log.exception("pricing failed")
            return None

    def close(self) -> None:
        self.telemetry.stop()
        if self.routing_log is not None:
            self.routing_log.close()
