"""Labelled queries (`LabelledQueries`) and the one function that turns them into a saved router
artefact. The sources are read by the owners of their formats, above this layer:

- eval runs: `localroute.evaluation.runs.from_eval_run`;
- the routing log with feedback: `localroute.monitoring.log_report.from_routing_log`;
- datasets with recorded outcomes (RouteLLM's Mixtral / GPT-4 correctness):
  `localroute.evaluation.routellm.load_routellm`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localroute.embeddings import Encoder
from localroute.errors import ConfigError
from localroute.routing.artifacts import RouterArtifact

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LabelledQueries:
    """Query texts and, per tier (cheapest first), an outcome in [0, 1] or NaN when unknown;
    optionally each row's task category (None: none), which an embedding router learns too."""

    texts: list[str]
    tiers: list[str]
    labels: np.ndarray
    source: str = ""
    skipped: int = 0
    ids: list[str] = field(default_factory=list)
    categories: Sequence[str | None] = field(default_factory=list)  # empty: no row carries one

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.texts), len(self.tiers)):
            raise ValueError("labels must be (n_texts, n_tiers)")
        if self.categories and len(self.categories) != len(self.texts):
            raise ValueError("categories must be empty or one per text")

    def subset(self, idx: np.ndarray | list[int]) -> LabelledQueries:
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledQueries([self.texts[i] for i in idx], self.tiers, self.labels[idx], self.source, 0,
                               [self.ids[i] for i in idx] if self.ids else [],
                               [self.categories[i] for i in idx] if self.categories else [])


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

        return train_embedding(x, data.labels, data.tiers, encoder.name, training=training,
                               categories=data.categories or None, **params)
    raise ConfigError(f"unknown router kind {kind!r}: classifier or embedding", param="kind")
