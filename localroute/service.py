"""The composition root: the tiers from settings, the routers by model id, the spend budget, the
rate limits, the shared state (Redis) they may keep, and the monitoring that watches them. The HTTP app (server/app.py), `localroute ask` and the
benchmarks all build the same `Service`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localroute.backends.base import load_backend
from localroute.backends.budget import Budget, SharedSpendBudget, SpendBudget, SpendStore
from localroute.backends.capabilities import capabilities_for
from localroute.backends.supervised import SupervisedBackend, supervised
from localroute.errors import ConfigError, ModelNotFoundError
from localroute.monitoring.cost import CostAccountant, RequestCost
from localroute.monitoring.prometheus import Metrics
from localroute.monitoring.record import Observer, RequestRecord
from localroute.monitoring.routing_log import RoutingLog
from localroute.monitoring.telemetry import Nvml, Telemetry
from localroute.routing.base import Decision, Router, Tier
from localroute.routing.cascade import CascadeRouter
from localroute.routing.repetition import RepetitionCheck
from localroute.settings import Settings
from localroute.shared_state import Limits, RateLimiter, SharedState
from localroute.types import Generation

log = logging.getLogger(__name__)

__all__ = ["CASCADE", "Monitoring", "Service", "attach_budget", "build_rate_limiter", "build_shared_state",
           "build_tiers"]


CASCADE = "localroute/cascade"


class Service:
    """The routers by model id and the observers of finished requests."""

    def __init__(self, settings: Settings, tiers: Sequence[Tier]) -> None:
        self.settings = settings
        self.tiers = list(tiers)
        cascade = CascadeRouter(
            self.tiers, settings.confidence_aggregator, settings.confidence_quantile_alpha, CASCADE,
            on_failure=settings.escalation_failure_policy,
            on_budget="degrade" if settings.budget_exhausted_policy == "degrade" else "fail",
            repetition=RepetitionCheck(settings.repetition_min_repeats, settings.repetition_min_coverage),
            early_escalation=settings.early_escalation,
            fields={ts.name: tuple(ts.confidence_fields) for ts in settings.ladder() if ts.confidence_fields},
        )
        self.routers: dict[str, Router] = {CASCADE: cascade}
        self.shared_state = build_shared_state(settings)
        self.budget = attach_budget(self.tiers, settings, self.shared_state)
        self.rate_limiter = build_rate_limiter(settings, self.shared_state)
        if self.shared_state is not None:
            for tier in self.tiers:  # a remote tier's breaker is shared by every replica
                breaker = getattr(tier.backend, "breaker", None)
                if breaker is not None and not tier.backend.is_local:
                    self.shared_state.attach_breaker(breaker)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                self.shared_state.start()
        for tier in self.tiers:  # a tier's name bypasses routing
            self.routers[tier.name] = CascadeRouter(
                [Tier(tier.name, tier.backend, None, tier.capabilities)], settings.confidence_aggregator,
                settings.confidence_quantile_alpha, tier.name, fields=cascade.fields,
            )
        from localroute.routing.prerouter import (
            build_policies,  # classifier/embedding/hybrid/verified, if configured
            category_neighbours,
        )

        self.routers.update(build_policies(settings, self.tiers, cascade))
        # places requests nothing else placed by the embedding index's labelled rows (categories.py)
        self.category_neighbours = category_neighbours(settings, self.routers)
        self.feedback: Any = None  # localroute.monitoring.feedback.FeedbackStore when the routing log is on (lifespan)
        self.responses: Any = None  # localroute.monitoring.response_store.ResponseStore, as feedback
        self.observers: list[Observer] = []
        self.monitoring: Monitoring | None = None  # telemetry, costs, metrics, routing log (lifespan)
        self.created = int(time.time())

    def router(self, model: str) -> Router:
        router = self.routers.get(model)
        if router is None:
            raise ModelNotFoundError(
                f"model {model!r} not found; available: {', '.join(self.routers)}", param="model"
            )
        return router

    def record(self, rec: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer(rec)
            except Exception:  # an observer must never break a response
                log.exception("observer %r failed", observer)

    async def record_async(self, rec: RequestRecord) -> None:
        """`record` on the event loop, for a response's background task (a plain function would
        be sent to a worker thread)."""
        self.record(rec)

    async def aclose(self) -> None:
        try:
            for tier in self.tiers:
                await tier.backend.aclose()
        finally:
            if self.shared_state is not None:
                await self.shared_state.aclose()
            store = getattr(self.budget, "store", None)
            if store is not None:
                store.close()

    async def budget_snapshot(self) -> dict[str, Any] | None:
        """The budget's period, cap and spend (Redis's when shared), for /health."""
        if self.budget is None:
            return None
        if isinstance(self.budget, SharedSpendBudget):
            return await self.budget.asnapshot()
        return self.budget.snapshot()


def build_tiers(settings: Settings) -> list[Tier]:
    """Load the ladder. Thresholds: a tier's own `threshold`, else the calibration file's (when its
    model hash, template and aggregator still match; otherwise a loud warning), else the default."""
    ladder = settings.ladder()
    backends = [supervised(ts, settings, load_backend) for ts in ladder]  # native engines in their own process
    calibrated: dict[str, float] = {}
    if settings.calibration_path is not None:
        from localroute.calibration_file import backend_fingerprint, calibrated_thresholds

        fingerprints = {ts.name: backend_fingerprint(b) for ts, b in zip(ladder[:-1], backends[:-1])}
        calibrated = calibrated_thresholds(settings.calibration_path, settings.confidence_aggregator,
                                           settings.confidence_quantile_alpha, fingerprints)
    tiers = []
    for i, (ts, backend) in enumerate(zip(ladder, backends)):
        last = i == len(ladder) - 1
        threshold = None if last else ts.threshold
        if threshold is None and not last:
            threshold = calibrated.get(ts.name, settings.default_threshold)
        elif ts.name in calibrated and not last:
            log.warning("tier %s: configured threshold %s overrides the calibrated %s", ts.name, threshold,
                        calibrated[ts.name])
        context = ts.n_ctx or ts.max_model_len or settings.n_ctx
        tiers.append(Tier(ts.name, backend, threshold, capabilities_for(ts, context)))
    return tiers


def build_shared_state(settings: Settings) -> SharedState | None:
    """The Redis connection when `redis_url` is set (nothing is connected until first use)."""
    if settings.redis_url is None:
        return None
    return SharedState(settings.redis_url.get_secret_value(), settings.shared_state_timeout_s,
                       settings.shared_state_failure, settings.shared_state_retry_s)


def build_rate_limiter(settings: Settings, state: SharedState | None) -> RateLimiter | None:
    """Per-key limits when any are configured (in Redis when `state` is given)."""
    def limits(rl: Any) -> Limits:
        return Limits(rl.requests_per_min, rl.tokens_per_min, rl.concurrent)

    if settings.rate_limit_default is None and not settings.rate_limits:
        return None
    default = limits(settings.rate_limit_default) if settings.rate_limit_default is not None else None
    lease_ttl_s = max(settings.frontier_timeout_s, settings.queue_timeout_s) + 60
    return RateLimiter(state, default, {k: limits(v) for k, v in settings.rate_limits.items()}, lease_ttl_s)


def attach_budget(tiers: Sequence[Tier], settings: Settings, state: SharedState | None = None) -> Budget | None:
    """Give every remote tier one budget when a cap is configured: in Redis with `state` (one cap
    across replicas), else in process with its spend persisted to `budget_state_path`. A remote
    tier must have prices (its own, or the price table's) or the cap could not be enforced."""
    if settings.budget_usd is None and settings.budget_per_key_usd is None:
        return None
    budget: Budget
    if state is not None:
        ttl = settings.budget_hold_ttl_s or settings.frontier_timeout_s + 30
        budget = SharedSpendBudget(state, settings.budget_usd, settings.budget_per_key_usd, settings.budget_period,
                                   hold_ttl_s=ttl)
    else:
        store = SpendStore(Path(settings.budget_state_path)) if settings.budget_state_path is not None else None
        budget = SpendBudget(settings.budget_usd, settings.budget_per_key_usd, settings.budget_period, store=store)
    for tier in tiers:
        backend: Any = tier.backend
        if backend.is_local or not hasattr(backend, "budget") or getattr(backend, "self_hosted", False):
            continue  # a self-hosted fleet is priced by its GPU-hours, not spent from the frontier budget
        if backend.input_usd_per_mtok is None or backend.output_usd_per_mtok is None:
            from localroute.monitoring.pricing import load_price_table

            price = load_price_table(settings.price_file).with_override(
                backend.model, backend.input_usd_per_mtok, backend.output_usd_per_mtok
            )
            if price is None:
                raise ConfigError(
                    f"budget_usd: tier {tier.name} (model {backend.model!r}) has no price; set "
                    f"frontier_input_usd_per_mtok/frontier_output_usd_per_mtok or the tier's prices",
                    param="budget_usd",
                )
            backend.input_usd_per_mtok = price.input_usd_per_mtok
            backend.output_usd_per_mtok = price.output_usd_per_mtok
        backend.budget = budget
    return budget


def cpu_clock(tiers: Sequence[Tier]) -> Callable[[], float]:
    """The CPU seconds local answers are priced from: this process's, plus every engine process's
    (engine_isolation = "process", the default: the engine's work is in its own process and not in
    this one's process_time())."""
    engines = [t.backend for t in tiers if isinstance(t.backend, SupervisedBackend)]
    if not engines:
        return time.process_time

    def total() -> float:
        return time.process_time() + sum(e.engine_cpu_s() for e in engines)

    return total


class Monitoring:
    """Everything that watches a running Service: the telemetry sampler, the cost accountant, the
    Prometheus metrics and (when `routing_log_path` is set) the routing log. Built in the app's
    lifespan; `close()` stops the sampler and drains the log."""

    def __init__(self, settings: Settings, tiers: Sequence[Tier], nvml: Nvml | None = None,
                 shared_state: SharedState | None = None) -> None:
        self.telemetry = Telemetry(settings.telemetry_interval_s, nvml=nvml, cpu_clock=cpu_clock(tiers))
        self.costs = CostAccountant(settings, tiers, self.telemetry)
        self.telemetry.load = self.costs.load
        tier_list = list(tiers)
        self.metrics = Metrics(lambda: tier_list, self.telemetry)
        if shared_state is not None:
            self.metrics.registry.register(_SharedStateCollector(shared_state))
        self.routing_log: RoutingLog | None = None
        target = settings.routing_log_target()
        if target is not None:
            self.routing_log = RoutingLog(target, settings.routing_log_retention_days, settings.log_prompts,
                                          self.telemetry, spill_path=settings.routing_log_spill_path,
                                          batch_s=settings.routing_log_batch_s)
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



class _SharedStateCollector:
    """/metrics families of the shared state (read at scrape time)."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def collect(self) -> Any:
        return self.state.metrics()
