"""Embedding router: an index of past queries (vector, per-tier outcome); a new query goes where
similar past queries were answered well.

For each tier, its success estimate is the similarity-weighted mean outcome of the k nearest
indexed queries that have an outcome for that tier, shrunk toward the tier's overall success rate
by `prior_weight` pseudo-neighbours (so two lucky neighbours do not make a certainty). A query whose
nearest neighbour is below `novelty_similarity` (cosine) is novel: the router says so and the
policy falls back to the cascade, which pays for a cheap answer but judges it on its own merits.

Category neighbours (issue 19): rows trained with a task category (`train_embedding(categories=)`,
stored as the `categories` array, "" for none) form a second index of their own, so a request that
nobody placed in a category can take the majority category of its k nearest labelled neighbours
whose cosine similarity reaches a floor (`nearest_category`; settings `category_neighbours_k`,
`category_neighbours_min_similarity`). Majority is a plurality of those neighbours; a tie goes to
the category whose tied neighbours are the more similar in sum. None qualifies: no category.

Search: numpy brute force (one matrix-vector product) up to `BRUTE_FORCE_MAX` rows, where it stays
under about a millisecond on a laptop-class core; above that an HNSW graph (hnswlib, the `ann`
extra) built at load time. Without hnswlib a large index still works by brute force, slower.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class CategoryVote:
    """The category of a query's nearest labelled neighbours, and the vote that chose it."""

    category: str
    votes: dict[str, int] = field(default_factory=dict)
    neighbours: int = 0  # labelled neighbours at or above the similarity floor (of the k looked at)
    nearest_similarity: float = -1.0

    def evidence(self) -> dict[str, Any]:
        return {"votes": dict(self.votes), "neighbours": self.neighbours,
                "nearest_similarity": round(self.nearest_similarity, 4)}


def vote_category(categories: list[str], sims: np.ndarray, min_similarity: float) -> CategoryVote | None:
    """The plurality category among neighbours (most similar first) at or above `min_similarity`;
    ties to the larger summed similarity, then the name. None when no neighbour qualifies."""
    kept = [(c, float(s)) for c, s in zip(categories, sims) if float(s) >= min_similarity and c]
    if not kept:
        return None
    counts = Counter(c for c, _ in kept)
    weight: dict[str, float] = {}
    for c, s in kept:
        weight[c] = weight.get(c, 0.0) + s
    best = min(counts, key=lambda c: (-counts[c], -weight[c], c))
    return CategoryVote(best, dict(counts), len(kept), kept[0][1])


def _names(categories: Sequence[str | None]) -> list[str]:
    """Each row's category, "" for none and for one that is no category name (routing/categories.py:
    a name becomes a response header, a metrics label and a log value, so a free-text label from a
    dataset never votes); how many were left out is logged, not what they were."""
    from localroute.routing.categories import is_name

    names = [c or "" for c in categories]
    bad = sum(1 for c in names if c and not is_name(c))
    if bad:
        log.warning("%d labelled rows carry no valid category name (1-64 letters, digits or _ . : -): left "
                    "unlabelled", bad)
    return [c if is_name(c) else "" for c in names]


class CategoryNeighbours:
    """The labelled rows of an embedding index (their vectors and categories), searched apart."""

    def __init__(self, vectors: np.ndarray, categories: np.ndarray, brute_force_max: int = BRUTE_FORCE_MAX,
                 cache: Path | None = None, whole: EmbeddingIndex | None = None) -> None:
        """`whole`: the model's index of every row, searched as is when every row is labelled (no
        second copy, no second HNSW build); `cache`: the HNSW file of the labelled rows' own index."""
        names = _names([str(c) for c in categories])
        keep = np.asarray([bool(c) for c in names], dtype=bool)
        self.categories = [c for c, k in zip(names, keep) if k]
        self.index: EmbeddingIndex | None = None
        if whole is not None and len(self.categories) == len(whole) and bool(keep.all()):
            self.index = whole
        elif self.categories:
            self.index = EmbeddingIndex(np.asarray(vectors)[keep], brute_force_max, cache=cache)

    def __len__(self) -> int:
        return len(self.categories)

    def nearest_category(self, v: np.ndarray, k: int, min_similarity: float) -> CategoryVote | None:
        if self.index is None or k <= 0:
            return None
        idx, sims = self.index.search(v, k)
        return vote_category([self.categories[i] for i in idx], sims, min_similarity)


class EmbeddingModel:
    """Similarity-weighted success per tier among the k nearest indexed queries."""

    kind = "embedding"

    def __init__(self, art: RouterArtifact, novelty_similarity: float | None = None,
                 brute_force_max: int = BRUTE_FORCE_MAX, categories: bool = True) -> None:
        """`categories`: build the category index of rows that carry one (False where nothing
        would ask it: `category_neighbours_k` = 0)."""
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
        cats = art.arrays.get("categories")
        neighbours = None
        if categories and cats is not None and cats.shape == (len(self.index),):
            neighbours = CategoryNeighbours(art.arrays["vectors"], cats, brute_force_max,
                                            cache.with_name(f"{cache.name[:-5]}.categories.hnsw") if cache else None,
                                            whole=self.index)
        # None unless some row carries a category: then nothing embeds a request to place it
        self.category_neighbours = neighbours if neighbours is not None and len(neighbours) else None

    def nearest_category(self, v: np.ndarray, k: int, min_similarity: float) -> CategoryVote | None:
        """The category of the query's nearest labelled neighbours (module docstring), or None."""
        if self.category_neighbours is None:
            return None
        return self.category_neighbours.nearest_category(v, k, min_similarity)

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
    categories: Sequence[str | None] | None = None,
) -> RouterArtifact:
    """Index every labelled query; nothing is fitted beyond the per-tier prior success rate. With
    `categories` (one per row, None for none), the rows that carry one also place unlabelled
    requests in a category (module docstring)."""
    prior = np.asarray([np.nanmean(col) if np.any(~np.isnan(col)) else 0.5 for col in labels.T], dtype=np.float32)
    arrays = {"vectors": np.asarray(x, dtype=np.float32), "outcomes": np.asarray(labels, dtype=np.float32),
              "prior": prior}
    names = _names(categories) if categories is not None else []
    if any(names):
        if len(names) != len(arrays["vectors"]):
            raise ValueError("categories must have one entry per row")
        arrays["categories"] = np.asarray(names, dtype=str)  # unicode: no pickle on load
        training = {**(training or {}), "category_rows": sum(1 for c in names if c)}
    return RouterArtifact(
        kind="embedding",
        encoder=encoder,
        tiers=list(tiers),
        arrays=arrays,
        params={"k": k, "novelty_similarity": novelty_similarity, "prior_weight": prior_weight},
        training={"n_rows": len(x), **(training or {})},
    )


def load_model(art: RouterArtifact, **kwargs: Any) -> Any:
    """The inference object for an artefact of either kind."""
    if art.kind == "embedding":
        return EmbeddingModel(art, **kwargs)
    from localroute.routing.classifier import ClassifierModel

    return ClassifierModel(art)
