"""What `serve` runs for issue 19 next to the routers: the per-category metrics, the shadow
evaluator (monitoring/shadow.py) with its own frontier backend and budget, and the calibration
watcher that applies a new calibration file (pooled and per-category thresholds) without a restart,
on a change of the file (polled every `calibration_watch_s`) or on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localroute.backends.budget import SharedSpendBudget, SpendBudget
from localroute.calibration_file import (
    backend_fingerprint,
    calibrated_category_thresholds,
    calibrated_thresholds,
    load_calibration,
    quality_targets,
)
from localroute.errors import ConfigError
from localroute.monitoring.shadow import CategoryMetrics, Judge, ShadowEvaluator
from localroute.routing.categories import CategoryLabels
from localroute.service import Service
from localroute.settings import Settings
from localroute.shared_state import SharedState

log = logging.getLogger(__name__)

__all__ = ["LiveQualityRuntime", "apply_calibration"]


def _configured(service: Service) -> dict[str, float | None]:
    return {ts.name: ts.threshold for ts in service.settings.ladder()}


def apply_calibration(service: Service) -> dict[str, Any]:
    """Read the calibration file and set every non-final tier's pooled and per-category thresholds
    in place (a tier's configured `threshold` still wins over the pooled one). Returns what changed."""
    settings, path = service.settings, service.settings.calibration_path
    local = service.tiers[:-1]
    if path is None or not local:
        return {}
    fingerprints = {t.name: backend_fingerprint(t.backend) for t in local}
    pooled = calibrated_thresholds(path, settings.confidence_aggregator, settings.confidence_quantile_alpha,
                                   fingerprints)
    per_category = calibrated_category_thresholds(path, settings.confidence_aggregator,
                                                  settings.confidence_quantile_alpha, fingerprints)
    configured = _configured(service)
    changes: dict[str, Any] = {}
    for tier in local:
        own = configured.get(tier.name)
        threshold = own if own is not None else pooled.get(tier.name, settings.default_threshold)
        categories = per_category.get(tier.name, {})
        if threshold != tier.threshold or categories != tier.category_thresholds:
            changes[tier.name] = {"threshold": [tier.threshold, threshold],
                                  "categories": {c: [tier.category_thresholds.get(c), v]
                                                 for c, v in categories.items()
                                                 if tier.category_thresholds.get(c) != v}}
            tier.set_thresholds(threshold, categories)  # one immutable version, swapped in one assignment
    return changes


def targets_of(path: Path | None) -> dict[str, float]:
    """The calibration file's quality targets by category (none when it is absent or unreadable)."""
    if path is None or not path.is_file():
        return {}
    try:
        return quality_targets(load_calibration(path))
    except ConfigError:
        return {}


def _preload(modules: list[str]) -> None:
    """Import `modules` now (in a worker thread at start-up), so that no first use imports them on
    the event loop; one that is missing or broken is left for its first use to report: a preload
    is an optimisation and never stops `serve` (a scipy whose import fails on an ABI mismatch
    raises more than ImportError)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("preload: %s not importable", name)
        except Exception as exc:  # noqa: BLE001 - an optimisation: whatever the import raised, serve on
            log.warning("preload: importing %s failed (%s); left for its first use", name, type(exc).__name__)


def scorer_of(settings: Settings, category: str, judged: bool) -> str:
    """How a category's shadow pairs are compared: its scorer; with a judge configured, `judge` for a
    category that names none (free text, the default category among them)."""
    cat = settings.categories.get(category)
    if judged and (cat is None or "scorer" not in cat.model_fields_set):
        return "judge"
    return cat.scorer if cat is not None else "exact"


def _priced(backend: Any, settings: Settings, how: str) -> Any:
    """A remote backend with prices (its own, else the price table's), so a shadow budget can be
    enforced on its calls; none with shadow_budget_usd set is a ConfigError."""
    if backend.input_usd_per_mtok is None or backend.output_usd_per_mtok is None:
        from localroute.monitoring.pricing import load_price_table

        price = load_price_table(settings.price_file).with_override(backend.model, backend.input_usd_per_mtok,
                                                                    backend.output_usd_per_mtok)
        if price is None and settings.shadow_budget_usd is not None:
            raise ConfigError(f"shadow_budget_usd: the model {backend.model!r} has no price; set {how}",
                              param="shadow_budget_usd")
        if price is not None:
            backend.input_usd_per_mtok, backend.output_usd_per_mtok = (price.input_usd_per_mtok,
                                                                      price.output_usd_per_mtok)
    return backend


def shadow_budget(settings: Settings, state: SharedState | None) -> SpendBudget | SharedSpendBudget:
    """The shadow calls' own cap: one across every replica when shared state (Redis) is configured,
    in its own key space (`shadow_budget`, never the serving budget's) and under the same
    `shared_state_failure` policy (fail_open: this process's own counters meanwhile; fail_closed: the
    shadow call is refused, a `failed` pair, never a client's error); else this process's."""
    if state is None or settings.shadow_budget_usd is None:  # no cap: nothing to share, no Redis to depend on
        return SpendBudget(settings.shadow_budget_usd, None, settings.shadow_budget_period)
    # a hold outlives no shadow call (each is cut at shadow_timeout_s); a crashed replica's expire
    return SharedSpendBudget(state, settings.shadow_budget_usd, None, settings.shadow_budget_period,
                             hold_ttl_s=settings.shadow_timeout_s + 30, namespace="shadow_budget")


# What loop.add_signal_handler / remove_signal_handler can raise for SIGHUP, a valid and catchable
# signal (asyncio docs and source, and a probe of asyncio and uvloop 0.23 on Python 3.11, main thread and not):
# - RuntimeError: asyncio, called off the main thread (set_wakeup_fd's ValueError re-raised), or a
#   closed loop; documented as "a problem setting up the handler";
# - ValueError: uvloop, called off the main thread (both add and remove); asyncio documents it for
#   an invalid or uncatchable signal number;
# - NotImplementedError: loops without signal support (Windows' Proactor and Selector loops).
# Tests run the app in a thread, and an embedding app may too: SIGHUP is then simply not wired
# (request_reload() and the file watch still work). signal.SIGHUP itself is absent on Windows,
# which is checked rather than caught, so that nothing else (an AttributeError of a bug) is hidden.
_SIGNAL_SETUP_ERRORS = (RuntimeError, ValueError, NotImplementedError)


def _add_sighup(callback: Callable[[], None]) -> bool:
    """Call `callback` on SIGHUP where the running loop can (module comment above); False if not."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(sighup, callback)
    except _SIGNAL_SETUP_ERRORS as exc:
        log.info("SIGHUP reload not available here (%s: %s); the file watch still applies changes",
                 type(exc).__name__, exc)
        return False
    return True


def _remove_sighup() -> None:
    with contextlib.suppress(*_SIGNAL_SETUP_ERRORS):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


class LiveQualityRuntime:
    """Started in the app's lifespan after the Service; `aclose()` before the backends close."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.labels = CategoryLabels(self.settings)
        self.metrics: CategoryMetrics | None = None
        self.shadow: ShadowEvaluator | None = None
        self.targets: dict[str, float] = {}
        self._watch: asyncio.Task[None] | None = None
        self._auto: asyncio.Task[None] | None = None
        self.last_recalibration: dict[str, Any] | None = None
        self._mtime: int | None = None
        self._hup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reloads = 0
        self._sighup = False  # our SIGHUP handler is installed (only then is it removed)

    async def start(self) -> None:
        svc = self.service
        path = self.settings.calibration_path
        self._loop = asyncio.get_running_loop()
        self.targets = targets_of(path)
        if path is not None and path.is_file():
            self._mtime = self._stat(path)
            changes = await asyncio.to_thread(apply_calibration, svc)
            if changes:
                log.info("calibration %s: per-category thresholds applied: %s", path, changes)
        if svc.monitoring is not None:
            self.metrics = CategoryMetrics(svc.monitoring.metrics.registry, self.labels.label, lambda: self.targets)
            svc.observers.append(self.metrics)
        if self.settings.shadow_sample_rate > 0 or any(
                c.shadow_sample_rate for c in self.settings.categories.values()):
            self.shadow = self._shadow()
            if self.shadow is not None:
                await asyncio.to_thread(_preload, self._lazy_modules())
                self.shadow.start()
                svc.observers.append(self.shadow)
        if path is not None and self.settings.auto_recalibrate_s > 0:
            if self.settings.auto_recalibrate_target is None or self.settings.routing_log_target() is None:
                raise ConfigError("auto_recalibrate_s needs auto_recalibrate_target and the routing log "
                                  "(routing_log_path or routing_log_url)",
                                  param="auto_recalibrate_target")
            self._auto = asyncio.get_running_loop().create_task(self._auto_recalibrate(path),
                                                                name="localroute-auto-recalibrate")
        if path is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watcher(path), name="localroute-calibration")
            self._sighup = _add_sighup(self._on_sighup)

    def _lazy_modules(self) -> list[str]:
        """Modules the shadow path would otherwise import on the event loop at first use: scipy.stats
        (the live quality gauges' Clopper-Pearson, computed in the async /metrics handler at the first
        scrape after a scored pair) and jsonschema (the json scorer, run by a shadow worker)."""
        names = ["scipy.stats"]
        if any(c.scorer == "json" for c in self.settings.categories.values()):
            names.append("jsonschema")
        return names

    def _on_sighup(self) -> None:
        self._hup.set()

    def request_reload(self) -> None:
        """Re-read the calibration file now, as SIGHUP does; callable from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._hup.set)

    def _shadow(self) -> ShadowEvaluator | None:
        from localroute.backends.base import load_backend
        from localroute.evaluation.agreement import agreement

        s = self.settings
        top = s.ladder()[-1]
        if top.kind != "openai" or len(s.ladder()) < 2:
            log.warning("shadow_sample_rate is set but the top tier %s is not a remote frontier: no shadowing",
                        top.name)
            return None
        backend: Any = _priced(load_backend(top, s), s, "frontier_input_usd_per_mtok/frontier_output_usd_per_mtok")
        budget = shadow_budget(s, self.service.shared_state)
        backend.budget = budget  # the shadow's own cap, never the serving budget
        judge = self._judge(budget)

        def rate_of(category: str) -> float:
            cat = s.categories.get(category)
            return cat.shadow_sample_rate if cat is not None and cat.shadow_sample_rate is not None \
                else s.shadow_sample_rate

        def compare(category: str, local: str, frontier: str) -> tuple[str, tuple[float, bool] | None]:
            cat = s.categories.get(category)
            scorer = scorer_of(s, category, judge is not None)
            if scorer == "judge":  # the evaluator asks the judge
                return scorer, None
            return scorer, agreement(scorer, local, frontier, cat.choices if cat is not None else None)

        monitoring = self.service.monitoring
        routing_log = monitoring.routing_log if monitoring is not None else None
        if routing_log is None:
            log.warning("shadow_sample_rate is set but there is no routing log: shadow pairs are counted in "
                        "/metrics, not stored (no report or --from-log on them)")
        return ShadowEvaluator(
            backend=backend, local_tiers={t.name for t in self.service.tiers[:-1]}, rate_of=rate_of,
            compare=compare, sink=routing_log.add_pairs if routing_log is not None else None,
            near_rate=s.shadow_near_threshold_rate,
            near_margin=s.shadow_near_threshold_margin, queue_size=s.shadow_queue_size,
            concurrency=s.shadow_concurrency, timeout_s=s.shadow_timeout_s, budget=budget, metrics=self.metrics,
            default_category=s.default_category, judge=judge)

    def _judge(self, budget: Any) -> Judge | None:
        """The LLM judge of free text, when one is configured (shadow_judge or shadow_judge_tier)."""
        from localroute.backends.base import load_backend

        s = self.settings
        if s.shadow_judge_tier is not None and s.shadow_judge is not None:
            raise ConfigError("set shadow_judge_tier or shadow_judge, not both", param="shadow_judge")
        ts = s.shadow_judge
        if s.shadow_judge_tier is not None:
            ts = next((t for t in s.ladder() if t.name == s.shadow_judge_tier), None)
            if ts is None:
                raise ConfigError(f"shadow_judge_tier {s.shadow_judge_tier!r} is not a tier", param="shadow_judge_tier")
        if ts is None:
            named = sorted(n for n, c in s.categories.items() if c.scorer == "judge")
            if named:
                raise ConfigError(f"categories {', '.join(named)} use scorer 'judge' but no judge is configured "
                                  "(shadow_judge_tier or shadow_judge)", param="shadow_judge_tier")
            return None
        if ts.kind != "openai":
            raise ConfigError(f"the shadow judge {ts.name!r} must be an OpenAI-compatible endpoint (kind openai), "
                              f"not {ts.kind!r}", param="shadow_judge")
        backend: Any = _priced(load_backend(ts, s), s, f"the judge tier {ts.name}'s input_usd_per_mtok/"
                               "output_usd_per_mtok")
        backend.budget = budget  # judge calls spend the shadow budget too
        return Judge(backend, s.shadow_timeout_s, s.shadow_judge_max_chars)

    @staticmethod
    def _stat(path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return None

    async def _watcher(self, path: Path) -> None:
        interval = self.settings.calibration_watch_s
        while True:
            try:
                await asyncio.wait_for(self._hup.wait(), interval if interval > 0 else None)
                self._hup.clear()
                why = "SIGHUP"
            except TimeoutError:
                mtime = self._stat(path)
                if mtime is None or mtime == self._mtime:
                    continue
                why = "file changed"
            self._mtime = self._stat(path)
            try:
                await self.reload(why)
            except Exception:
                log.exception("calibration reload failed; thresholds unchanged")

    async def _auto_recalibrate(self, path: Path) -> None:
        """Refit from the log on a schedule; only certified thresholds are applied (a category with too
        few pairs keeps what it had, an uncertified one falls back to the pooled threshold)."""
        from localroute.evaluation.from_log import calibrate_from_log

        s = self.settings
        target = s.routing_log_target()
        assert target is not None and s.auto_recalibrate_target is not None
        while True:
            await asyncio.sleep(s.auto_recalibrate_s)
            if not path.is_file():
                log.warning("auto_recalibrate: no calibration file at %s yet (run `localroute calibrate` once); "
                            "skipped", path)
                continue
            monitoring = self.service.monitoring
            try:
                if monitoring is not None and monitoring.routing_log is not None:
                    await asyncio.to_thread(monitoring.routing_log.flush)
                result = await asyncio.to_thread(calibrate_from_log, target, path, s,
                                                 s.auto_recalibrate_target, s.auto_recalibrate_delta,
                                                 s.auto_recalibrate_min_pairs,
                                                 time.time() - s.auto_recalibrate_window_s)
            except ConfigError as exc:
                log.warning("auto_recalibrate skipped: %s", exc.message)
                continue
            except Exception:
                log.exception("auto_recalibrate failed; thresholds unchanged")
                continue
            self.last_recalibration = result
            self._mtime = self._stat(path)  # applied here, not again by the file watch
            await self.reload("auto_recalibrate")

    async def reload(self, why: str = "requested") -> dict[str, Any]:
        """Apply the calibration file now (the watcher's and SIGHUP's action)."""
        path = self.settings.calibration_path
        changes = await asyncio.to_thread(apply_calibration, self.service)
        self.targets = targets_of(path)
        self.reloads += 1
        log.warning("CALIBRATION RELOADED from %s (%s): %s", path, why, changes or "no threshold changed")
        return changes

    async def aclose(self) -> None:
        for task in (self._watch, self._auto):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sighup:
            _remove_sighup()
            self._sighup = False
        if self.shadow is not None:
            await self.shadow.aclose()
