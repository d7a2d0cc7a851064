"""`localroute eval`: run one tier over a dataset and keep everything needed to rescore it later.

The run folder's format (meta.json + rows.jsonl) is `localroute.evaluation.runs`, its one reader and
writer. Rerunning the same command skips ids already in the run, so an interrupted run resumes
where it stopped; a folder holding a different run is refused.

Decoding is greedy (temperature 0) with the model's own chat template, as `serve` runs it; choice
tasks are scored on the free-form answer (the first choice it names), not on choice logprobs. A
choice row's request names its choices as labels, so the engine also scores every label at the
chosen one's position (label confidence, `row["label"]`), as `serve` does for a request with labels.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localroute.backends.base import Backend, load_backend
from localroute.calibration_file import backend_fingerprint, file_sha256
from localroute.errors import ConfigError, LocalrouteError
from localroute.evaluation.datasets import EvalItem, load_items, sample
from localroute.evaluation.runs import (
    META_FILE,
    RUN_VERSION,
    TOP_LOGPROBS,
    append_rows,
    read_meta,
    read_rows,
    tokens_to_json,
    write_meta,
)
from localroute.evaluation.scorers import JudgeScorer, Score, score_answer
from localroute.monitoring.cost import cpu_cost_usd
from localroute.monitoring.pricing import load_price_table
from localroute.settings import Settings, TierSettings
from localroute.types import Generation, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

TASK_MAX_TOKENS = {"choice": 24, "exact": 48, "numeric": 256, "spans": 96, "json": 192, "judge": 384}
CHOICE_METHOD = "free generation (greedy), scored on the first choice the answer names"


@dataclass(slots=True)
class EvalConfig:
    dataset: Path
    out_dir: Path
    tier: str | None = None
    limit: int | None = None
    seed: int = 0
    concurrency: int = 4
    frontier: str = "oracle"  # live | recorded:<model> | oracle
    max_tokens: int | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    verifier: str | None = None  # a tier asked "is this answer correct?": its P(Yes) is one more signal
    progress: bool = True


@dataclass(slots=True)
class RunSummary:
    out_dir: Path
    total: int
    computed: int
    skipped: int
    errors: int
    meta: dict[str, Any] = field(default_factory=dict)


def pick_tier(settings: Settings, name: str | None) -> TierSettings:
    ladder = settings.ladder()
    if name is None:
        return ladder[0]
    for ts in ladder:
        if ts.name == name:
            return ts
    raise ConfigError(f"unknown tier {name!r}; one of {', '.join(t.name for t in ladder)}", param="tier")


def resolve_recorded(items: Sequence[EvalItem], spec: str) -> str:
    """`recorded:gpt-4` -> the one outcome key equal to or containing `gpt-4`."""
    want = spec.removeprefix("recorded:")
    keys = sorted({k for it in items for k in it.outcomes})
    if want in keys:
        return want
    matches = [k for k in keys if want.casefold() in k.casefold()]
    if len(matches) != 1:
        raise ConfigError(f"--frontier {spec}: recorded models in this dataset: {', '.join(keys) or 'none'}",
                          param="frontier")
    return matches[0]


def model_file(ts: TierSettings, settings: Settings) -> Path | None:
    if ts.kind != "llama_cpp":
        return None
    from localroute.registry import resolve_model_path

    return resolve_model_path(ts.model, settings.models_dir)


def _sampling(cfg: EvalConfig, item: EvalItem) -> SamplingParams:
    return SamplingParams(
        max_tokens=cfg.max_tokens or item.max_tokens or TASK_MAX_TOKENS[item.task],
        temperature=0.0,
        seed=cfg.seed,
        stop=tuple(item.stop or ()),
        top_logprobs=TOP_LOGPROBS,
    )


def with_system(item: EvalItem) -> tuple[tuple[dict[str, Any], ...] | None, str | None]:
    """(messages, prompt) with the row's `system` prompt first: a system message (merged into one
    the row already starts with), or the prompt's first paragraph."""
    if item.messages is None:
        prompt = item.prompt or ""
        return None, f"{item.system}\n\n{prompt}" if item.system else prompt
    messages = [dict(m) for m in item.messages]
    if item.system:
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{item.system}\n\n{messages[0].get('content') or ''}"
        else:
            messages.insert(0, {"role": "system", "content": item.system})
    return tuple(messages), None


def _request(cfg: EvalConfig, item: EvalItem) -> GenerationRequest:
    """The request `serve` would get for this row; a choice row names its labels (label confidence)."""
    messages, prompt = with_system(item)
    labels = tuple(item.choices or ()) if item.task == "choice" else ()
    return GenerationRequest(messages=messages, prompt=prompt, params=_sampling(cfg, item),
                             request_id=f"eval-{item.id}", labels=labels)


def _score_json(s: Score | None) -> dict[str, Any] | None:
    if s is None:
        return None
    extracted = s.extracted if isinstance(s.extracted, (str, int, float, bool, type(None), list, dict)) else str(s.extracted)
    return {"score": s.value, "correct": s.correct, "extracted": extracted}


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Non-finite numbers as None (a run row is strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class _Runner:
    def __init__(self, settings: Settings, cfg: EvalConfig, tier: TierSettings, meta: dict[str, Any]) -> None:
        self.settings = settings
        self.cfg = cfg
        self.tier = tier
        self.meta = meta
        self.judge = (JudgeScorer(cfg.judge_url, cfg.judge_model or "gpt-4o-mini", cfg.judge_api_key)
                      if cfg.judge_url else None)
        self.backend: Backend | None = None
        self.frontier: Backend | None = None
        self.recorded = meta["frontier"]["model"] if meta["frontier"]["mode"] == "recorded" else None
        self.inflight = 0  # eval requests in the engine now: their CPU time is shared among them
        self.verifier: Any = None  # routing.verifier.Verifier when --verifier is given

    async def _frontier_outcome(self, item: EvalItem) -> tuple[dict[str, Any] | None, float | None]:
        mode = self.meta["frontier"]["mode"]
        if mode == "oracle":
            return {"score": 1.0, "correct": True, "source": "oracle"}, None
        if mode == "recorded":
            outcome = item.outcomes.get(self.recorded or "")
            if outcome is None:
                return None, None
            return {"score": outcome.value, "correct": outcome.value >= 0.5 if outcome.correct is None
                    else bool(outcome.correct), "source": f"recorded:{self.recorded}"}, None
        assert self.frontier is not None
        gen = await self.frontier.generate(_request(self.cfg, item))
        s = await score_answer(gen.text, item, self.judge)
        fs = self.settings.frontier_tier()
        price = load_price_table(self.settings.price_file).with_override(
            fs.model, fs.input_usd_per_mtok, fs.output_usd_per_mtok, fs.cached_input_usd_per_mtok)
        cost = price.cost_usd(gen.prompt_tokens, gen.completion_tokens) if price is not None else None
        return {"score": s.value, "correct": s.correct, "source": "live", "output": gen.text}, cost

    async def one(self, item: EvalItem) -> dict[str, Any]:
        assert self.backend is not None
        row: dict[str, Any] = {"id": item.id, "task": item.task}
        started = time.perf_counter()
        gen: Generation | None = None
        self.inflight += 1
        cpu0 = time.process_time()
        try:
            gen = await self.backend.generate(_request(self.cfg, item))
        except LocalrouteError as exc:  # in serving this answer would escalate: keep it, unconfident
            row["error"] = f"generation: {exc.code or type(exc).__name__}: {exc.message}"
        finally:
            # The process's CPU time over the call, shared among the eval requests decoded together
            # meanwhile (the same approximation serving uses), at usd_per_core_hour.
            cpu_s = (time.process_time() - cpu0) / self.inflight
            self.inflight -= 1
        row["cost_usd"] = cpu_cost_usd(cpu_s, self.settings.usd_per_core_hour)
        row["cost_inputs"] = {"method": "local_cpu", "cpu_s": round(cpu_s, 6),
                              "usd_per_core_hour": self.settings.usd_per_core_hour}
        row.update({
            "output": gen.text if gen else "",
            "finish_reason": gen.finish_reason if gen else "error",
            "tokens": tokens_to_json(gen.tokens) if gen else [],
            "prompt_tokens": gen.prompt_tokens if gen else 0,
            "completion_tokens": gen.completion_tokens if gen else 0,
            "latency_s": round(gen.latency_s if gen else time.perf_counter() - started, 6),
        })
        if gen is not None and isinstance(gen.extra.get("label"), dict):  # label confidence (choice rows)
            row["label"] = _json_safe(gen.extra["label"])
        if gen is not None and gen.extra.get("forced_tokens"):  # grammar-forced tokens (field confidence)
            row["forced_tokens"] = list(gen.extra["forced_tokens"])
        if self.verifier is not None and gen is not None:
            try:
                row["verifier_p_yes"] = await self.verifier.score(_request(self.cfg, item), gen.text)
            except LocalrouteError as exc:
                row["verifier_error"] = f"{exc.code or type(exc).__name__}: {exc.message}"
        try:
            cheap = await score_answer(gen.text, item, self.judge) if gen else Score(0.0, False)
            row["cheap"] = _score_json(cheap)
            frontier, cost = await self._frontier_outcome(item)
            row["frontier"] = frontier
            if cost is not None:
                row["frontier_cost_usd"] = cost
        except LocalrouteError as exc:
            row["scoring_error"] = f"{exc.code or type(exc).__name__}: {exc.message}"
        return row


async def run_eval(settings: Settings, cfg: EvalConfig) -> RunSummary:
    """Run (or resume) an evaluation; returns what was computed."""
    items = sample(load_items(cfg.dataset), cfg.limit, cfg.seed)
    if not items:
        raise ConfigError(f"dataset {cfg.dataset} is empty", param="dataset")
    tier = pick_tier(settings, cfg.tier)
    mode, _, _ = cfg.frontier.partition(":")
    if mode not in ("live", "recorded", "oracle"):
        raise ConfigError("--frontier must be live, recorded:<model> or oracle", param="frontier")
    frontier_meta: dict[str, Any] = {"mode": mode}
    if mode == "recorded":
        frontier_meta["model"] = resolve_recorded(items, cfg.frontier)
    elif mode == "live":
        if not settings.frontier_base_url:
            raise ConfigError("--frontier live needs frontier_base_url (LOCALROUTE_FRONTIER_BASE_URL)",
                              param="frontier")
        frontier_meta["model"] = settings.frontier_model
    else:
        frontier_meta["note"] = "oracle: the frontier is assumed always right; results are an upper bound"
    if any(it.task == "judge" for it in items) and not cfg.judge_url:
        raise ConfigError("this dataset has `judge` items: pass --judge-url and --judge-model", param="judge_url")
    path = model_file(tier, settings)
    key = {
        "dataset_sha256": file_sha256(cfg.dataset),
        "tier": tier.name,
        "model": tier.model,
        "model_sha256": file_sha256(path) if path else None,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed,
        "frontier": frontier_meta,
    }
    verifier_tier = pick_tier(settings, cfg.verifier) if cfg.verifier else None
    if verifier_tier is not None:  # only then: runs made without a verifier keep their key
        key["verifier"] = verifier_tier.name
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if (cfg.out_dir / META_FILE).is_file():
        old = read_meta(cfg.out_dir)
        if old.get("key") != key:
            raise ConfigError(f"{cfg.out_dir} holds a different run (dataset, tier, model, max_tokens, seed or "
                              f"frontier differ); choose another --out", param="out")
        meta = old
    else:
        meta = {
            "version": RUN_VERSION,
            "key": key,
            "dataset": str(cfg.dataset),
            "tier": tier.name,
            "tier_kind": tier.kind,
            "frontier": frontier_meta,
            "fingerprint": None,
            "sampling": {"temperature": 0.0, "top_logprobs": TOP_LOGPROBS, "logprobs": "raw",
                         "max_tokens": cfg.max_tokens or "per task", "choice_method": CHOICE_METHOD},
            "confidence_quantile_alpha": settings.confidence_quantile_alpha,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    meta["limit"] = cfg.limit
    meta["n_items"] = max(len(items), int(meta.get("n_items") or 0))
    done = {r["id"] for r in read_rows(cfg.out_dir)}
    pending = [it for it in items if it.id not in done]
    runner = _Runner(settings, cfg, tier, meta)
    errors = 0
    if pending:
        runner.backend = load_backend(tier, settings)
        if mode == "live":
            runner.frontier = load_backend(settings.frontier_tier(), settings)
        verifier_backend = None
        if verifier_tier is not None:
            from localroute.routing.verifier import Verifier

            same = verifier_tier.name == tier.name
            verifier_backend = runner.backend if same else load_backend(verifier_tier, settings)
            runner.verifier = Verifier(verifier_backend)
            if same:
                verifier_backend = None  # closed once, as the tier's backend
        try:
            meta["fingerprint"] = backend_fingerprint(runner.backend, path)
            write_meta(cfg.out_dir, meta)
            errors = await _run_pending(runner, pending, cfg)
        finally:
            await runner.backend.aclose()
            if runner.frontier is not None:
                await runner.frontier.aclose()
            if runner.judge is not None:
                await runner.judge.aclose()
            if verifier_backend is not None:
                await verifier_backend.aclose()
    else:
        write_meta(cfg.out_dir, meta)
    return RunSummary(cfg.out_dir, len(items), len(pending), len(items) - len(pending), errors, meta)


async def _run_pending(runner: _Runner, pending: list[EvalItem], cfg: EvalConfig) -> int:
    from tqdm import tqdm

    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    errors = 0

    async def guarded(item: EvalItem) -> dict[str, Any]:
        async with sem:
            return await runner.one(item)

    tasks = [asyncio.create_task(guarded(it)) for it in pending]
    bar = tqdm(total=len(pending), desc=f"eval {runner.tier.name}", unit="q", disable=not cfg.progress)
    try:
        with append_rows(cfg.out_dir) as append:
            for fut in asyncio.as_completed(tasks):
                row = await fut
                errors += bool(row.get("error") or row.get("scoring_error"))
                append(row)
                bar.update(1)
    finally:
        bar.close()
        for t in tasks:
            t.cancel()
    return errors
