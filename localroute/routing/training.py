"""Labelled queries for the routers, from the three sources `localroute train` reads, and the one
function that turns them into a saved artefact.

- eval runs (`localroute eval --out DIR`: `DIR/rows.jsonl` + `DIR/meta.json`, the query text
  joined from the dataset file the run names): tiers = [the run's tier, "frontier"];
- the routing log with feedback (`requests` rows with `prompt_text`, joined to `feedback` by
  request_id): the answering tier gets the feedback score, other tiers stay unknown;
- datasets with recorded outcomes (RouteLLM's Mixtral / GPT-4 correctness, see `routellm_eval`).

Sources are read defensively: a malformed row is skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localroute.embeddings import Encoder, request_text
from localroute.errors import ConfigError
from localroute.routing.artifacts import RouterArtifact

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LabelledQueries:
    """Query texts and, per tier (cheapest first), an outcome in [0, 1] or NaN when unknown."""

    texts: list[str]
    tiers: list[str]
    labels: np.ndarray
    source: str = ""
    skipped: int = 0
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.texts), len(self.tiers)):
            raise ValueError("labels must be (n_texts, n_tiers)")

    def subset(self, idx: np.ndarray | list[int]) -> LabelledQueries:
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledQueries([self.texts[i] for i in idx], self.tiers, self.labels[idx], self.source, 0,
                               [self.ids[i] for i in idx] if self.ids else [])


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).digest()[:16]


def embed_cached(encoder: Encoder, texts: list[str], cache_dir: Path | None = None, progress: bool = False) -> np.ndarray:
    """Encode texts through a per-text cache (one store per encoder: 16-byte text hashes + vectors).
    Training and evaluation re-embed the same thousands of prompts in different subsets and orders;
    a text's vector never changes, so each is computed once."""
    folder = cache_dir or Path.home() / ".cache" / "localroute" / "embeddings"
    store = folder / f"{encoder.name.replace(':', '_')}.npz"
    known: dict[bytes, np.ndarray] = {}
    if store.is_file():
        try:
            with np.load(store, allow_pickle=False) as data:
                keys, vecs = data["keys"], data["vectors"]
            if vecs.ndim == 2 and vecs.shape[1] == encoder.dim and len(keys) == len(vecs):
                known = {bytes(k): v for k, v in zip(keys, vecs)}
        except (OSError, ValueError, KeyError):
            known = {}  # a damaged cache is rebuilt, never trusted
    keys_needed = [_text_key(t) for t in texts]
    missing = list(dict.fromkeys(k for k in keys_needed if k not in known))
    if missing:
        todo = {k: t for k, t in zip(keys_needed, texts) if k in set(missing)}
        from tqdm import tqdm

        for k, t in tqdm(list(todo.items()), desc=f"embedding ({encoder.name})", unit="q", disable=not progress):
            known[k] = encoder.encode([t])[0]
        folder.mkdir(parents=True, exist_ok=True)
        all_keys = list(known)
        tmp = folder / f".{store.name}.tmp"
        with tmp.open("wb") as fh:
            np.savez(fh, keys=np.asarray(all_keys, dtype="S16"),
                     vectors=np.stack([known[k] for k in all_keys]).astype(np.float32))
        tmp.replace(store)
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.asarray(np.stack([known[k] for k in keys_needed]), dtype=np.float32)


def _score(value: Any) -> float:
    """An outcome dict/bool/number as a float in [0, 1], NaN when unusable."""
    if isinstance(value, dict):
        value = value.get("score", value.get("correct"))
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    return float("nan")


def from_eval_run(run_dir: Path) -> LabelledQueries:
    """An eval run's rows: cheap tier and frontier outcomes per query, text from its dataset."""
    rows_path, meta_path = run_dir / "rows.jsonl", run_dir / "meta.json"
    if not rows_path.is_file() or not meta_path.is_file():
        raise ConfigError(f"{run_dir} is not an eval run (needs rows.jsonl and meta.json)", param="from_eval")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dataset = Path(str(meta.get("dataset", "")))
    texts_by_id: dict[str, str] = {}
    if dataset.is_file():
        for line in dataset.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
                msgs = item.get("messages")
                texts_by_id[str(item["id"])] = request_text(tuple(msgs) if msgs else None, item.get("prompt"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    tiers = [str(meta.get("tier") or "cheap"), "frontier"]
    texts, labels, ids, skipped = [], [], [], 0
    for line in rows_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            text = texts_by_id.get(str(row["id"])) or row.get("prompt")
            cheap, frontier = _score(row.get("cheap")), _score(row.get("frontier"))
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        if not text or np.isnan(cheap):
            skipped += 1
            continue
        texts.append(str(text))
        labels.append([cheap, frontier])
        ids.append(str(row["id"]))
    return LabelledQueries(texts, tiers, np.asarray(labels, dtype=np.float32).reshape(-1, 2),
                           f"eval:{run_dir}", skipped, ids)


def from_routing_log(db: Path, tiers: list[str]) -> LabelledQueries:
    """Requests with stored prompt text and at least one feedback row: the answering tier's outcome
    is the mean feedback score; the tiers that did not answer are unknown (NaN)."""
    if not db.is_file():
        raise ConfigError(f"routing log not found: {db}", param="routing_log_path")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT r.request_id, r.prompt_text, r.tier, AVG(f.score) FROM requests r "
            "JOIN feedback f ON f.request_id = r.request_id "
            "WHERE r.prompt_text IS NOT NULL AND r.tier IS NOT NULL AND f.score IS NOT NULL "
            "GROUP BY r.request_id, r.prompt_text, r.tier"
        ).fetchall()
    except sqlite3.OperationalError as exc:
        raise ConfigError(f"routing log {db} has no feedback yet ({exc})", param="routing_log_path") from None
    finally:
        conn.close()
    index = {t: i for i, t in enumerate(tiers)}
    texts, labels, ids, skipped = [], [], [], 0
    for request_id, prompt_text, tier, score in rows:
        if tier not in index:
            skipped += 1
            continue
        label = np.full(len(tiers), np.nan, dtype=np.float32)
        label[index[tier]] = float(score)
        texts.append(_last_user(str(prompt_text)))
        labels.append(label)
        ids.append(str(request_id))
    return LabelledQueries(texts, list(tiers), np.asarray(labels, dtype=np.float32).reshape(-1, len(tiers)),
                           f"log:{db}", skipped, ids)


def _last_user(logged: str) -> str:
    """The routing log stores chat prompts as 'role: content' lines; routers embed the last user turn."""
    marker = "user: "
    pos = logged.rfind("\n" + marker)
    if pos >= 0:
        return logged[pos + 1 + len(marker):]
    return logged.removeprefix(marker)


def train_router(
    kind: str,
    data: LabelledQueries,
    encoder: Encoder,
    cache_dir: Path | None = None,
    progress: bool = False,
    **params: Any,
) -> RouterArtifact:
    """Embed the queries and fit a `classifier` or index an `embedding` router."""
    if len(data.texts) < 2:
        raise ConfigError(f"need at least 2 labelled queries to train, got {len(data.texts)}", param="data")
    x = embed_cached(encoder, data.texts, cache_dir, progress)
    training = {"source": data.source, "skipped_rows": data.skipped,
                "outcome_rate": [None if np.all(np.isnan(c)) else float(np.nanmean(c)) for c in data.labels.T]}
    if kind == "classifier":
        from localroute.routing.classifier import train_classifier

        return train_classifier(x, data.labels, data.tiers, encoder.name, training=training, **params)
    if kind == "embedding":
        from localroute.routing.embedding import train_embedding

        return train_embedding(x, data.labels, data.tiers, encoder.name, training=training, **params)
    raise ConfigError(f"unknown router kind {kind!r}: classifier or embedding", param="kind")
