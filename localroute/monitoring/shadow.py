"""Shadow evaluation (issue 19): a random share of the locally accepted answers is also asked of
the frontier, off the response path, and the two answers are compared with the category's scorer;
each draw is a row of the routing log's `shadow_pairs` table, handed to the routing log's writer
(`RoutingLog.add_pairs`: batched, spilled and replayed when the database is down, on SQLite or
PostgreSQL alike).

Off the response path means: the draw happens in an observer, which runs after the client's answer
was sent (serving.py hands records over in the response's background task, or when a stream has
ended), and it only puts the draw on a bounded queue (`put_nowait`; a full queue drops the draw and
counts it). A fixed number of worker tasks take draws from the queue and call a frontier backend of
their own (its own connection pool, circuit breaker and spend budget, `shadow_budget_usd`), each
call under `shadow_timeout_s`. A frontier that is down, slow or over its shadow budget therefore
costs the serving path nothing and holds at most `shadow_queue_size + shadow_concurrency` draws
(each a request and an answer text) in memory.

Free text (a category whose scorer is `judge`, or one that names no scorer, when `shadow_judge` or
`shadow_judge_tier` is configured) is compared by an LLM judge (`Judge`): an OpenAI-compatible
endpoint of its own (its own pool; it may be the frontier's), asked the fixed prompt below
(`JUDGE_SYSTEM`, `JUDGE_USER`) at temperature 0 for one word, `agree` or `disagree`. The judge sees
the conversation both answers reply to (`judge_conversation`: system prompt, earlier turns, tool
calls and results, one `[role]` block each), within `shadow_judge_max_chars`: the oldest turns
other than the system prompts and the last turn are left out first (a marker in their place),
then the middle of what is left; the prompt's heading then says what was left out. Its call is
reserved against and charged to the shadow budget, and its cost is added to the pair's. A judge that
fails, times out, is over the budget or answers anything else makes the pair `unscorable` (with the
reason in `error`); the client's answer was sent long before, so it never affects a client.

What a pair costs (`cost_usd`) is what its calls were charged to the shadow budget (a
`budget.SpendMeter` around each call): the provider's usage; for a call cut after its response
headers, before its usage came (billed by the provider all the same), the shadow backends charge
an estimate (`cut_charge = "estimate"`: the prompt's tokens counted locally plus the completion
tokens received so far, at the tier's prices) rather than the worst-case reservation; nothing for a
call that never reached the provider. The pairs' costs therefore add up to the shadow spend.

Sampling is Bernoulli per accepted answer at the category's rate; with confidence stratification
(`shadow_near_threshold_rate`), answers whose confidence lies within the margin above the threshold
are drawn at that rate instead. Every row stores its draw probability, so estimates are reweighted
(Horvitz-Thompson) and recalibration (evaluation/from_log.py `calibrate_from_log`) can tell what
counts toward a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from localroute.backends.budget import Budget, SpendMeter, current_meter
from localroute.errors import LocalrouteError
from localroute.monitoring.record import RequestRecord
from localroute.monitoring.routing_log import PAIR_COLUMNS, open_store
from localroute.settings import Settings
from localroute.types import Generation, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["JUDGE_MAX_CHARS", "JUDGE_SYSTEM", "JUDGE_USER", "PAIR_COLUMNS", "CategoryMetrics", "Draw", "Judge",
           "JudgeVerdict", "LiveQuality", "PairSink", "ShadowEvaluator", "clopper_pearson", "insert_pairs",
           "judge_conversation"]

# (category, local answer, frontier answer) -> (scorer name, (score, agrees) or None if not comparable)
Compare = Callable[[str, str, str], tuple[str, tuple[float, bool] | None]]

# a shadow_pairs row's columns (routing_log.PAIR_COLUMNS) -> nothing; must not wait on a database
PairSink = Callable[[list[tuple[Any, ...]]], None]


# The judge's fixed prompt (README, Live quality): the conversation, then the local answer as A and
# the frontier's as B; one word back. Temperature 0 and max_tokens JUDGE_MAX_TOKENS. `{shortened}` is
# empty, or JUDGE_SHORTENED when the conversation was cut to fit the size cap.
JUDGE_SYSTEM = ("You compare two answers to the same request. Reply with exactly one word: agree if both answers "
                "give the same answer (the same facts, result, choice or conclusion, however worded), disagree "
                "otherwise.")
JUDGE_USER = ("Conversation{shortened}:\n<<<\n{conversation}\n>>>\n\n"
              "Both answers reply to the conversation's last turn.\n\n"
              "Answer A:\n<<<\n{local}\n>>>\n\nAnswer B:\n<<<\n{frontier}\n>>>\n\n"
              "Do A and B agree? Reply agree or disagree.")
JUDGE_SHORTENED = " (shortened to fit the size cap: {what})"
JUDGE_MAX_TOKENS = 3
JUDGE_MAX_CHARS: int = Settings.model_fields["shadow_judge_max_chars"].default  # the conversation's characters


@dataclass(frozen=True, slots=True)
class JudgeVerdict:
    """agrees: None when the judge gave no verdict (then `error` says why); cost_usd of its call."""

    agrees: bool | None
    cost_usd: float = 0.0
    error: str | None = None


class Judge:
    """An LLM judge of free-text answers (module docstring): `backend` is an OpenAI-compatible
    remote backend whose `budget` is the shadow budget."""

    def __init__(self, backend: Any, timeout_s: float = 30.0, max_chars: int = JUDGE_MAX_CHARS) -> None:
        self.backend = backend
        if hasattr(backend, "confidence_logprobs"):
            backend.confidence_logprobs = False  # a verdict word: no logprobs asked (a tier outside the ladder would)
        _charge_cuts_as_estimates(backend)
        self.timeout_s = timeout_s
        self.max_chars = max_chars

    def request(self, draw: Draw, frontier: str) -> GenerationRequest:
        """The judge's request for a draw (a fixed prompt: the module's JUDGE_SYSTEM / JUDGE_USER)."""
        conversation, shortened = judge_conversation(draw.request.messages, draw.request.prompt, self.max_chars)
        user = JUDGE_USER.format(shortened=JUDGE_SHORTENED.format(what=shortened) if shortened else "",
                                 conversation=conversation, local=_fenced(draw.answer), frontier=_fenced(frontier))
        return GenerationRequest(messages=({"role": "system", "content": JUDGE_SYSTEM},
                                           {"role": "user", "content": user}),
                                 params=SamplingParams(max_tokens=JUDGE_MAX_TOKENS, temperature=0.0),
                                 request_id=f"judge-{draw.request.request_id.removeprefix('shadow-')}",
                                 category=draw.category)

    @staticmethod
    def verdict(text: str) -> bool | None:
        """agree -> True, disagree -> False: the whole reply is that one word (case, surrounding
        punctuation and markup aside); anything else ("agree or disagree", "I agree", "agree, but")
        is no verdict, None, rather than a guess from its first word."""
        words = text.split()
        word = words[0].strip(_VERDICT_TRIM).lower() if len(words) == 1 else ""
        return {"agree": True, "disagree": False}.get(word)

    async def __call__(self, draw: Draw, frontier: str) -> JudgeVerdict:
        from localroute.backends.budget import BudgetExceededError

        meter = SpendMeter()
        try:
            gen = await _metered(meter, self.backend.generate(self.request(draw, frontier)), self.timeout_s)
        except BudgetExceededError:
            return JudgeVerdict(None, meter.usd, "judge_over_budget")
        except TimeoutError:
            return JudgeVerdict(None, meter.usd, "judge_timeout")
        except LocalrouteError as exc:
            return JudgeVerdict(None, meter.usd, f"judge_{exc.code or exc.error_type}")
        agrees = self.verdict(gen.text)
        return JudgeVerdict(agrees, _charged(meter, self.backend, gen), None if agrees is not None else "judge_no_verdict")


_VERDICT_TRIM = ".,;:!?\"'*`_()[]<>"
_FENCE = re.compile(r"<{3,}|>{3,}")


def _fenced(text: str) -> str:
    """`text` made safe inside the judge prompt's <<< >>> fences: a run of three or more < or > (which
    a user's request, or an answer echoing it, could use to close its fence and write a fake
    "Answer B" or instruction outside it) is spaced out, so only the prompt's own fences remain."""
    return _FENCE.sub(lambda m: " ".join(m.group()), text)


_LEFT_OUT = "[... earlier turns left out ...]"


def _turn(message: dict[str, Any]) -> str:
    """One turn of the judge's conversation: `[role]` (a tool result with its call id), then its
    text (backends/openai_wire.py `message_text`: tool calls included), fenced."""
    from localroute.backends.openai_wire import message_text

    role = str(message.get("role") or "user")
    if role in ("tool", "function"):
        of = message.get("tool_call_id") or message.get("name")
        role = f"tool result{f' for {of}' if of else ''}"
    return f"[{role}]\n{_fenced(message_text(message))}"


def judge_conversation(messages: tuple[dict[str, Any], ...] | None, prompt: str | None,
                       max_chars: int) -> tuple[str, str]:
    """The conversation as the judge reads it, at most about `max_chars` characters, and what was
    left out to fit ("" when nothing). Turns go first, oldest first, except the system (and
    developer) prompts, which say what a good answer is, and the last turn, which the answers
    reply to; a marker stands where they were. Then, if the rest is still too long, its middle."""
    if not messages:
        blocks = [f"[user]\n{_fenced(prompt or '')}"]
        keep = [True]
    else:
        blocks = [_turn(m) for m in messages]
        keep = [True] * len(blocks)
    sep = 2  # "\n\n" between blocks
    total = sum(len(b) for b in blocks) + sep * (len(blocks) - 1)
    dropped = 0
    for i, m in enumerate(messages or ()):
        if total <= max_chars:
            break
        if i == len(blocks) - 1 or m.get("role") in ("system", "developer"):
            continue
        if i == 0 or keep[i - 1]:  # a marker opens each run of left-out turns
            total += len(_LEFT_OUT) + sep
        keep[i] = False
        total -= len(blocks[i]) + sep
        dropped += 1
    out: list[str] = []
    for i, block in enumerate(blocks):
        if keep[i]:
            out.append(block)
        elif i == 0 or keep[i - 1]:
            out.append(_LEFT_OUT)
    text = "\n\n".join(out)
    what = [f"its {dropped} oldest turn{'s' if dropped != 1 else ''} left out"] if dropped else []
    if len(text) > max_chars:
        cut = len(text) - max_chars
        head = max_chars // 2
        text = f"{text[:head]}\n[... {cut} characters left out ...]\n{text[head + cut:]}"
        what.append(f"{cut} characters cut from its middle")
    return text, ", ".join(what)


def _charge_cuts_as_estimates(backend: Any) -> None:
    """A shadow or judge backend charges a call cut after its headers an estimate (module docstring)."""
    if hasattr(backend, "cut_charge"):
        backend.cut_charge = "estimate"


async def _metered(meter: SpendMeter, call: Awaitable[Generation], timeout_s: float) -> Generation:
    """`call` under `timeout_s` with `meter` as the current one: what the backend settles the call
    at (even when it fails or times out: wait_for waits for the cancelled call to settle) lands in it."""
    token = current_meter.set(meter)
    try:
        return await asyncio.wait_for(call, timeout_s)
    finally:
        current_meter.reset(token)


def _charged(meter: SpendMeter, backend: Any, gen: Generation) -> float:
    """What a successful call cost: what its backend settled it at; from a backend that meters
    nothing (one not over HTTP, in tests), its usage at its prices."""
    if meter.calls:
        return meter.usd
    return (gen.prompt_tokens * (getattr(backend, "input_usd_per_mtok", None) or 0.0)
            + gen.completion_tokens * (getattr(backend, "output_usd_per_mtok", None) or 0.0)) / 1e6


def clopper_pearson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial proportion at `level` (k, n may be
    fractional effective counts: the Beta quantiles still apply as an approximation)."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


@dataclass(slots=True)
class Draw:
    """An accepted answer drawn for a shadow call: what the worker needs, no more."""

    request: GenerationRequest
    answer: str
    category: str
    tier: str
    confidence: float | None
    threshold: float | None
    sample_rate: float
    stratum: str
    ts: float


def insert_pairs(target: Path | str, rows: list[tuple[Any, ...]]) -> None:
    """Append shadow_pairs rows (PAIR_COLUMNS) to the routing log at `target` (a SQLite path or a
    postgresql:// URL; its migrations created the table) at once, in the calling thread. `serve`
    queues them on the routing log's writer instead (RoutingLog.add_pairs)."""
    store = open_store(target)
    try:
        store.insert_pairs(rows)
    finally:
        store.close()


class LiveQuality:
    """Running per-category agreement of shadowed answers (reweighted by 1 / draw probability),
    for /metrics; `localroute report` computes the same from the routing log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._w: dict[str, list[float]] = {}  # category -> [sum w, sum w * agrees, sum w^2, n]

    def add(self, category: str, weight: float, agrees: bool) -> None:
        with self._lock:
            s = self._w.setdefault(category, [0.0, 0.0, 0.0, 0.0])
            s[0] += weight
            s[1] += weight * agrees
            s[2] += weight * weight
            s[3] += 1

    def snapshot(self) -> dict[str, tuple[float, float, int]]:
        """category -> (effective n (Kish), effective agreements, pairs)."""
        with self._lock:
            out = {}
            for cat, (w, wa, w2, n) in self._w.items():
                n_eff = w * w / w2 if w2 > 0 else 0.0
                out[cat] = (n_eff, n_eff * wa / w if w > 0 else 0.0, int(n))
            return out


class _LiveCollector(Collector):
    def __init__(self, live: LiveQuality, label: Callable[[str], str], targets: Callable[[], dict[str, float]]) -> None:
        self.live, self.label, self.targets = live, label, targets

    def collect(self) -> Any:
        """Never raises: an exception in a collector fails the whole /metrics scrape."""
        try:
            yield from self._families()
        except Exception:
            log.exception("live quality gauges unavailable this scrape")

    def _families(self) -> list[GaugeMetricFamily]:
        point = GaugeMetricFamily("localroute_live_quality", "Share of shadowed local answers that agree with the "
                                  "frontier, per category (reweighted).", labels=["category"])
        lower = GaugeMetricFamily("localroute_live_quality_lower", "Clopper-Pearson 95% lower bound of "
                                  "localroute_live_quality.", labels=["category"])
        upper = GaugeMetricFamily("localroute_live_quality_upper", "Clopper-Pearson 95% upper bound of "
                                  "localroute_live_quality.", labels=["category"])
        target = GaugeMetricFamily("localroute_live_quality_target", "The calibration's quality target of the "
                                   "category.", labels=["category"])
        for lab, (n_eff, k_eff, n) in sorted(self.live.snapshot().items()):  # keyed by label already
            if n == 0:
                continue
            lo, hi = clopper_pearson(k_eff, n_eff)
            point.add_metric([lab], k_eff / n_eff if n_eff > 0 else math.nan)
            lower.add_metric([lab], lo)
            upper.add_metric([lab], hi)
        for cat, value in sorted(self.targets().items()):
            target.add_metric([self.label(cat)], value)
        return [point, lower, upper, target]


class CategoryMetrics:
    """The per-category /metrics series: requests by category and answering tier (an observer),
    shadow draws by outcome, shadow spend, and the live quality gauges."""

    def __init__(self, registry: CollectorRegistry, label: Callable[[str], str],
                 targets: Callable[[], dict[str, float]] = dict) -> None:
        self.label = label
        self.live = LiveQuality()
        self.requests = Counter("localroute_category_requests", "Finished requests by task category and answering "
                                "tier (category labels capped: category_max_labels).", ["category", "tier"],
                                registry=registry)
        self.shadow = Counter("localroute_shadow_draws", "Shadow draws by category and outcome (scored, "
                              "unscorable, failed, over_budget, dropped).", ["category", "outcome"],
                              registry=registry)
        self.shadow_cost = Counter("localroute_shadow_cost_usd", "What shadow calls cost (counted apart from the "
                                   "serving budget).", registry=registry)
        registry.register(_LiveCollector(self.live, label, targets))

    def __call__(self, rec: RequestRecord) -> None:
        decision = rec.decision
        if decision is None:
            return
        category = str(decision.evidence.get("category", ""))
        if category:
            self.requests.labels(self.label(category), decision.answered_by or "none").inc()


class ShadowEvaluator:
    """Observer of finished requests that shadows a sample of the locally accepted answers (module
    docstring). `start()` on the serving loop; `aclose()` stops the workers (pending draws dropped)."""

    def __init__(self, *, backend: Any, local_tiers: set[str], rate_of: Callable[[str], float],
                 compare: Compare, log_path: Path | str | None = None, sink: PairSink | None = None,
                 near_rate: float | None = None,
                 near_margin: float = 0.5, queue_size: int = 64, concurrency: int = 2, timeout_s: float = 30.0,
                 budget: Budget | None = None, metrics: CategoryMetrics | None = None,
                 default_category: str = "default", rng: random.Random | None = None,
                 judge: Judge | None = None) -> None:
        self.backend = backend
        _charge_cuts_as_estimates(backend)
        self.judge = judge  # compares the answers of a category whose scorer comes back as "judge"
        self.local_tiers = local_tiers
        self.rate_of = rate_of
        self.compare = compare
        self.log_path = log_path
        self.sink = sink  # the routing log's writer queue; else, with log_path, inserted from a thread
        self.near_rate, self.near_margin = near_rate, near_margin
        self.queue_size, self.concurrency, self.timeout_s = queue_size, concurrency, timeout_s
        self.budget = budget
        self.metrics = metrics
        self.default_category = default_category
        self.rng = rng or random.Random()
        self.stats = {"drawn": 0, "dropped": 0, "scored": 0, "unscorable": 0, "failed": 0, "over_budget": 0}
        self._queue: asyncio.Queue[Draw] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    # ---- lifecycle ----

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.queue_size)
        self._workers = [self._loop.create_task(self._work(), name=f"localroute-shadow-{i}")
                         for i in range(self.concurrency)]

    async def aclose(self) -> None:
        self._closed = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        await self.backend.aclose()
        if self.judge is not None and self.judge.backend is not self.backend:
            await self.judge.backend.aclose()

    @property
    def pending(self) -> int:
        """Draws waiting in the queue (in flight ones not counted)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued draw is done (tests, shutdown)."""
        if self._queue is not None:
            await asyncio.wait_for(self._queue.join(), timeout_s)

    # ---- the observer (after the answer was sent) ----

    def __call__(self, rec: RequestRecord) -> None:
        self.observe(rec)

    def observe(self, rec: RequestRecord) -> None:
        """Draw or not; never raises, never waits."""
        try:
            draw = self._draw(rec)
        except Exception:
            log.exception("shadow draw failed")
            return
        if draw is None or self._loop is None or self._closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._enqueue(draw)
        else:
            self._loop.call_soon_threadsafe(self._enqueue, draw)

    def _rate(self, category: str, conf: float | None, threshold: float | None) -> tuple[float, str]:
        if (self.near_rate is not None and conf is not None and threshold is not None
                and conf - threshold < self.near_margin):
            return self.near_rate, "near"
        return self.rate_of(category), "all" if self.near_rate is None else "far"

    def _draw(self, rec: RequestRecord) -> Draw | None:
        decision, gen = rec.decision, rec.generation
        request = rec.extra.get("request")
        if (rec.status_code != 200 or decision is None or gen is None or request is None or decision.degraded
                or gen.raw is not None or decision.answered_by not in self.local_tiers):
            return None
        attempt = next((a for a in reversed(decision.attempts) if a.tier == decision.answered_by and a.accepted), None)
        if attempt is None or attempt.threshold is None:  # a tier answering alone (its name as model) is no cascade
            return None
        category = str(decision.evidence.get("category", self.default_category))
        rate, stratum = self._rate(category, attempt.confidence, attempt.threshold)
        if rate <= 0 or self.rng.random() >= rate:
            return None
        shadow = replace(request, params=replace(request.params, top_logprobs=0),
                         request_id=f"shadow-{rec.request_id}", category=category)
        return Draw(shadow, gen.text, category, decision.answered_by, attempt.confidence, attempt.threshold,
                    rate, stratum, time.time())

    def _enqueue(self, draw: Draw) -> None:
        assert self._queue is not None
        self.stats["drawn"] += 1
        try:
            self._queue.put_nowait(draw)
        except asyncio.QueueFull:
            self.stats["dropped"] += 1
            self._count(draw.category, "dropped")

    def _count(self, category: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.shadow.labels(self.metrics.label(category), outcome).inc()

    # ---- the workers ----

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            draw = await self._queue.get()
            try:
                await self._shadow(draw)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("shadow evaluation failed")
            finally:
                self._queue.task_done()

    async def _shadow(self, draw: Draw) -> None:
        from localroute.backends.budget import BudgetExceededError

        t0 = time.perf_counter()
        status, scorer, score, agrees, error, cost = "scored", None, None, None, None, None
        meter = SpendMeter()
        try:
            gen = await _metered(meter, self.backend.generate(draw.request), self.timeout_s)
        except BudgetExceededError:
            status, error = "over_budget", "budget_exceeded"
        except TimeoutError:
            status, error = "failed", "shadow_timeout"
        except LocalrouteError as exc:
            status, error = "failed", exc.code or exc.error_type
        else:
            cost = _charged(meter, self.backend, gen)
            scorer, result = self.compare(draw.category, draw.answer, gen.text)
            if scorer == "judge":
                if self.judge is None:
                    result, error = None, "no_judge"
                else:
                    verdict = await self.judge(draw, gen.text)
                    cost += verdict.cost_usd
                    error = verdict.error
                    result = None if verdict.agrees is None else (float(verdict.agrees), verdict.agrees)
            if result is None:
                status = "unscorable"
            else:
                score, agrees = result
        if cost is None and meter.usd > 0:  # a failed call the provider billed (cut after its headers)
            cost = meter.usd
        latency = time.perf_counter() - t0
        self.stats[status] += 1
        self._count(draw.category, status)
        if self.metrics is not None:
            if cost:
                self.metrics.shadow_cost.inc(cost)
            if agrees is not None:
                # keyed by the capped label: clients naming ever new categories cannot grow this
                self.metrics.live.add(self.metrics.label(draw.category), 1.0 / draw.sample_rate, agrees)
        row = (draw.ts, draw.request.request_id.removeprefix("shadow-"), draw.category, draw.tier, draw.confidence,
               draw.threshold, draw.sample_rate, draw.stratum, status, scorer, score,
               None if agrees is None else int(agrees), error, cost, round(latency, 6))
        if self.sink is not None:
            self.sink([row])
        elif self.log_path is not None:
            await asyncio.to_thread(insert_pairs, self.log_path, [row])
