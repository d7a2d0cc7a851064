"""Embedding router: an index of past queries (vector, per-tier outcome); a new query goes where
similar past queries were answered well.

For each tier, its success estimate is the similarity-weighted mean outcome of the k nearest
indexed queries that have an outcome for that tier, shrunk toward the tier's overall success rate
by `prior_weight` pseudo-neighbours (so two lucky neighbours do not make a certainty). A query whose
nearest neighbour is below `novelty_similarity` (cosine) is novel: the router says so and the
policy falls back to the cascade, which pays for a cheap answer but judges it on its own merits.

Search: numpy brute force (one matrix-vector product) up to `BRUTE_FORCE_MAX` rows, where it stays
under about a millisecond on a laptop-class core; above that an HNSW graph (hnswlib, the `ann`
extra) built at load time. Without hnswlib a large index still works by brute force, slower.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from localroute.routing.artifacts import RouterArtifact

log = logging.getLogger(__name__)

BRUTE_FORCE_MAX = 4096
DEFAULT_K = 50
DEFAULT_NOVELTY = 0.35


class EmbeddingIndex:
    """k-nearest-neighbour search by cosine similarity over unit vectors."""

    def __init__(self, vectors: np.ndarray, brute_force_max: int = BRUTE_FORCE_MAX, ef: int = 64,
                 cache: Path | None = None) -> None:
        """`cache`: a file for the HNSW graph; loaded when present, written after a build (building
        100k rows takes about a minute on 2 cores, loading it well under a second)."""
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._hnsw: Any = None
        self.method = "brute_force"
        if len(self.vectors) > brute_force_max:
            try:
                import hnswlib
            except ImportError:
                log.warning("hnswlib not installed: %d-row index searched by brute force "
                            "(pip install 'localroute[ann]')", len(self.vectors))
            else:
                n, d = self.vectors.shape
                index = hnswlib.Index(space="ip", dim=d)
                if cache is not None and cache.is_file():
                    index.load_index(str(cache), max_elements=n)
                else:
                    index.init_index(max_elements=n, ef_construction=100, M=16, random_seed=0)
                    index.add_items(self.vectors, np.arange(n))
                    if cache is not None:
                        _save_index(index, cache)
                index.set_ef(ef)
                index.set_num_threads(1)
                self._hnsw, self.method = index, "hnsw"

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, cosine similarities) of the k nearest rows, most similar first."""
        k = min(k, len(self.vectors))
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        if self._hnsw is not None:
            labels, dist = self._hnsw.knn_query(q[None, :], k=k)
            return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)
        sims = self.vectors @ q
        if k < len(sims):
            idx = np.argpartition(-sims, k - 1)[:k]
        else:
            idx = np.arange(len(sims))
        idx = idx[np.argsort(-sims[idx], kind="stable")]
        return idx, sims[idx]


def _save_index(index: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        index.save_index(str(tmp))
        tmp.replace(path)
    except OSError:  # a read-only folder only costs a rebuild next time
        log.warning("could not cache the HNSW index at %s", path)
        tmp.unlink(missing_ok=True)


class EmbeddingModel:
    """Similarity-weighted success per tier among the k nearest indexed queries."""

    kind = "embedding"

    def __init__(self, art: RouterArtifact, novelty_similarity: float | None = None,
                 brute_force_max: int = BRUTE_FORCE_MAX) -> None:
        self.artifact = art
        self.tiers = art.tiers
        self.encoder_name = art.encoder
        self.k = int(art.params.get("k", DEFAULT_K))
        self.prior_weight = float(art.params.get("prior_weight", 1.0))
        self.novelty_similarity = float(
            novelty_similarity if novelty_similarity is not None else art.params.get("novelty_similarity", DEFAULT_NOVELTY)
        )
        cache = (art.path.with_name(f"{art.path.name}.{art.digest[:16]}.hnsw")
                 if art.path is not None and art.digest else None)
        self.index = EmbeddingIndex(art.arrays["vectors"], brute_force_max, cache=cache)
        self._outcomes = art.arrays["outcomes"].astype(np.float32)
        self._known = ~np.isnan(self._outcomes)
        self._filled = np.nan_to_num(self._outcomes)
        self._prior = art.arrays["prior"].astype(np.float32)

    def score(self, v: np.ndarray) -> dict[str, Any]:
        idx, sims = self.index.search(v, self.k)
        nearest = float(sims[0]) if len(sims) else -1.0
        w = np.clip(sims, 0.0, None)[:, None] * self._known[idx]
        num = (w * self._filled[idx]).sum(axis=0) + self.prior_weight * self._prior
        den = w.sum(axis=0) + self.prior_weight
        p = num / den
        return {
            "p_good": [float(x) for x in p],
            "novel": nearest < self.novelty_similarity,
            "nearest_similarity": nearest,
        }

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(good) per tier for each row (offline evaluation)."""
        x = np.atleast_2d(x)
        return np.asarray([self.score(row)["p_good"] for row in x])


def train_embedding(
    x: np.ndarray,
    labels: np.ndarray,
    tiers: list[str],
    encoder: str,
    k: int = DEFAULT_K,
    novelty_similarity: float = DEFAULT_NOVELTY,
    prior_weight: float = 1.0,
    training: dict[str, Any] | None = None,
) -> RouterArtifact:
    """Index every labelled query; nothing is fitted beyond the per-tier prior success rate."""
    prior = np.asarray([np.nanmean(col) if np.any(~np.isnan(col)) else 0.5 for col in labels.T], dtype=np.float32)
    return RouterArtifact(
        kind="embedding",
        encoder=encoder,
        tiers=list(tiers),
        arrays={"vectors": np.asarray(x, dtype=np.float32), "outcomes": np.asarray(labels, dtype=np.float32),
                "prior": prior},
        params={"k": k, "novelty_similarity": novelty_similarity, "prior_weight": prior_weight},
        training={"n_rows": len(x), **(training or {})},
    )


def load_model(art: RouterArtifact, **kwargs: Any) -> Any:
    """The inference object for an artefact of either kind."""
    if art.kind == "embedding":
        return EmbeddingModel(art, **kwargs)
    from localroute.routing.classifier import ClassifierModel

    return ClassifierModel(art)
