"""The eval-run folder: its one reader and writer (`localroute eval` writes it; the report,
`calibrate` and `train --from-eval` read it through here).

A run is a folder: `meta.json` (what was run: dataset hash, tier, model fingerprint, sampling) and
`rows.jsonl`, one finished query per line, appended as soon as it finishes. Each row keeps the
answer, every generated token as `[token_id, token, logprob, [[alternative, logprob], ...]]` with
the top TOP_LOGPROBS alternatives (so every aggregator in `localroute.routing.confidence` can be
recomputed without the model), the cheap and frontier scores, token counts and latency. A torn last
line (a run killed mid-write) is ignored, and recomputed when the run resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from localroute.embeddings import request_text
from localroute.errors import ConfigError
from localroute.evaluation.metrics import Array
from localroute.routing.confidence import AGGREGATORS, SIGNALS, answer_confidence, field_confidences
from localroute.routing.training import LabelledQueries
from localroute.types import TokenLogprob, TopLogprob

__all__ = [
    "META_FILE", "ROWS_FILE", "RUN_VERSION", "TOP_LOGPROBS", "RunTable", "append_rows", "from_eval_run",
    "read_meta", "read_rows", "tokens_from_json", "tokens_to_json", "write_meta",
]

META_FILE = "meta.json"
ROWS_FILE = "rows.jsonl"
RUN_VERSION = 1
TOP_LOGPROBS = 5  # alternatives kept per token: enough for every aggregator (confidence.TOP_K_NEEDED)


def tokens_to_json(tokens: Sequence[TokenLogprob]) -> list[list[Any]]:
    return [[t.token_id, t.token, t.logprob, [[a.token, a.logprob] for a in t.top_logprobs]] for t in tokens]


def tokens_from_json(raw: Sequence[Sequence[Any]]) -> list[TokenLogprob]:
    """Rebuild tokens from a run row so aggregators can be recomputed."""
    return [
        TokenLogprob(token_id=int(t[0]), token=str(t[1]), logprob=float(t[2]),
                     top_logprobs=tuple(TopLogprob(token=str(a[0]), logprob=float(a[1])) for a in t[3]))
        for t in raw
    ]


def _scan(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows (the last one per id) and how many lines were unreadable."""
    path = run_dir / ROWS_FILE
    if not path.is_file():
        return [], 0
    rows: dict[str, dict[str, Any]] = {}
    unreadable = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            rows[str(row["id"])] = row
        except (ValueError, KeyError, TypeError):
            unreadable += 1
    return list(rows.values()), unreadable


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Finished rows; a torn line (killed mid-write) is ignored and recomputed on resume."""
    return _scan(run_dir)[0]


def read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an eval run (no {META_FILE})", param="run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", param="run") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a run's meta (not a JSON object)", param="run")
    return data


def write_meta(run_dir: Path, meta: dict[str, Any]) -> Path:
    """Through a temporary file and a rename, so a reader never sees half of it."""
    path = run_dir / META_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


@contextmanager
def append_rows(run_dir: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A function appending one finished row, flushed at once (an interrupted run loses at most the
    line being written)."""
    with (run_dir / ROWS_FILE).open("a", encoding="utf-8") as fh:
        def append(row: dict[str, Any]) -> None:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()

        yield append


def row_extra(row: dict[str, Any]) -> dict[str, Any]:
    """The Generation.extra parts a row keeps (label scores, grammar-forced tokens)."""
    extra: dict[str, Any] = {}
    if isinstance(row.get("label"), dict):
        extra["label"] = row["label"]
    if row.get("forced_tokens"):
        extra["forced_tokens"] = row["forced_tokens"]
    return extra


def _confidence(tokens: list[TokenLogprob], output: str, aggregator: str, alpha: float,
                extra: dict[str, Any] | None = None, fields: Sequence[str] = ()) -> float:
    """What the cascade would have computed for this answer; an answer without evidence (None) can
    only escalate, as -inf does."""
    conf = answer_confidence(aggregator, tokens, alpha, output, extra, fields)
    return float("-inf") if conf is None else conf


class RunTable:
    """The usable rows of a run as arrays: confidences per aggregator, cheap and frontier scores.
    `fields`: the fields whose confidence decides field_confidence (the tier's `confidence_fields`,
    as serve uses them; empty: every field)."""

    def __init__(self, run_dir: Path, fields: Sequence[str] = ()) -> None:
        self.out_dir = run_dir
        self.fields = tuple(fields)
        self.meta = read_meta(run_dir)
        rows = read_rows(run_dir)
        self.usable = [r for r in rows if r.get("cheap") is not None and r.get("frontier") is not None
                       and not r.get("scoring_error")]
        self.n_excluded = len(rows) - len(self.usable)
        self.ids = [r["id"] for r in self.usable]
        self.cheap: Array = np.array([r["cheap"]["score"] for r in self.usable], dtype=np.float64)
        self.correct = np.array([bool(r["cheap"]["correct"]) for r in self.usable], dtype=bool)
        self.frontier: Array = np.array([r["frontier"]["score"] for r in self.usable], dtype=np.float64)
        self.generation_errors = sum(1 for r in self.usable if r.get("error"))
        self.alpha = float(self.meta.get("confidence_quantile_alpha", 0.1))
        answers = [(tokens_from_json(r.get("tokens") or []), str(r.get("output") or ""), row_extra(r))
                   for r in self.usable]
        self.conf: dict[str, Array] = {
            name: np.array([_confidence(t, text, name, self.alpha) for t, text, _ in answers], dtype=np.float64)
            for name in AGGREGATORS
        }
        # the decision-carrying signals, as the cascade computes them (rows without labels or without
        # structure fall back to mean_logprob there too, so calibrate can fit either on any run)
        for name in SIGNALS:
            self.conf[name] = np.array([_confidence(t, text, name, self.alpha, x, self.fields)
                                        for t, text, x in answers], dtype=np.float64)
        self.n_labelled = sum(1 for r in self.usable if isinstance(r.get("label"), dict))
        self.n_structured = sum(1 for t, _, _ in answers if t and field_confidences(t))
        if self.usable and all("verifier_p_yes" in r for r in self.usable):  # eval --verifier TIER
            self.conf["verifier"] = np.array([r["verifier_p_yes"] for r in self.usable], dtype=np.float64)
        self.completion_tokens = [int(r.get("completion_tokens", 0)) for r in self.usable]

    @property
    def n(self) -> int:
        return len(self.usable)

    @property
    def upper_bound(self) -> bool:
        return bool(self.meta["frontier"]["mode"] == "oracle")


def _score(value: Any) -> float:
    """An outcome dict/bool/number as a float in [0, 1], NaN when unusable."""
    if isinstance(value, dict):
        value = value.get("score", value.get("correct"))
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    return float("nan")


def _dataset_texts(dataset: Path, categories: dict[str, str] | None = None) -> dict[str, str]:
    """Query text per item id, read defensively: a malformed line is left out. With `categories`,
    also each item's task category (`meta.localroute_category`, as a client names it) where it has one."""
    texts: dict[str, str] = {}
    if not dataset.is_file():
        return texts
    for line in dataset.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            msgs = item.get("messages")
            texts[str(item["id"])] = request_text(tuple(msgs) if msgs else None, item.get("prompt"))
            category = (item.get("meta") or {}).get("localroute_category")
            if categories is not None and isinstance(category, str) and category:
                categories[str(item["id"])] = category
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return texts


def from_eval_run(run_dir: Path) -> LabelledQueries:
    """An eval run's rows as labelled queries for `localroute train`: tiers = [the run's tier,
    "frontier"], the query text joined from the dataset file the run names. A malformed row is
    skipped and counted, never fatal."""
    if not (run_dir / ROWS_FILE).is_file() or not (run_dir / META_FILE).is_file():
        raise ConfigError(f"{run_dir} is not an eval run (needs {ROWS_FILE} and {META_FILE})", param="from_eval")
    meta = read_meta(run_dir)
    categories_by_id: dict[str, str] = {}
    texts_by_id = _dataset_texts(Path(str(meta.get("dataset", ""))), categories_by_id)
    tiers = [str(meta.get("tier") or "cheap"), "frontier"]
    rows, skipped = _scan(run_dir)
    texts, labels, ids = [], [], []
    for row in rows:
        text = texts_by_id.get(str(row["id"])) or row.get("prompt")
        cheap, frontier = _score(row.get("cheap")), _score(row.get("frontier"))
        if not text or np.isnan(cheap):
            skipped += 1
            continue
        texts.append(str(text))
        labels.append([cheap, frontier])
        ids.append(str(row["id"]))
    categories = [categories_by_id.get(i) for i in ids] if categories_by_id else []  # an embedding router learns them
    return LabelledQueries(texts, tiers, np.asarray(labels, dtype=np.float32).reshape(-1, 2),
                           f"eval:{run_dir}", skipped, ids, categories)
