"""What placing a request in a task category by its nearest labelled neighbours adds to its latency.

    .venv/bin/python scripts/bench_categories.py --vectors-cache /tmp/bench_categories.npz --embed-only
    flock -x /tmp/cpu.lock .venv/bin/python scripts/bench_categories.py [--sizes 1000 10000] [--queries 300]
        [--encoder minilm-int8] [--vectors-cache /tmp/bench_categories.npz] [--json]

The lookup `serve` runs before routing for a request nothing else placed (routing/categories.py
`NeighbourCategories.resolve`: the request's last user turn embedded in a worker thread, then the
k nearest labelled rows voted on), timed per request on the event loop, end to end, with the
bundled embedding model (`minilm-int8` by default: `localroute train`'s default encoder) and a
labelled index of `--sizes` rows. The index is real: rows of banking77, tweeteval sentiment, MMLU
and GSM8K (a quarter each, category = the dataset), embedded with the same encoder; the queries
are other rows of the same four, in random order, each with its own request id (no memo hit: the
cost a request pays when its policy does not embed it anyway). Reports p50/p99 of the whole
lookup and of its two parts (the embedding; the search and vote), the index's search method
(brute force up to 4,096 rows, HNSW above when hnswlib is installed), and the share of queries
placed in their own dataset's category. Prints the CPU and the 1-minute load average before and
after: run it under the exclusive CPU lock, figures taken while other work runs are not
representative. Embedding the index rows is not what is measured (training does it once) and takes
minutes on 2 cores: `--vectors-cache` keeps them in a file (checked against the encoder and the
rows' texts), so `--embed-only` can fill it first outside the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("banking77", "tweeteval_sentiment", "mmlu", "gsm8k")


def _stats(samples_s: list[float]) -> dict[str, Any]:
    from localroute.bench.metrics import percentiles_ms

    return {k: round(v, 3) if isinstance(v, float) else v for k, v in percentiles_ms(samples_s).items()}


def _rows(data: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (text a router embeds, category) rows, shuffled: an equal share of each dataset, a
    smaller one's shortfall (GSM8K has 1,319) spread over the others."""
    from localroute.embeddings import request_text
    from localroute.evaluation import datasets

    rng = random.Random(seed)
    pools = {}
    for name in DATASETS:
        loader: Callable[[Path], Iterator[Any]] = getattr(datasets, name)
        texts = [request_text(tuple(item.messages or ()), item.prompt) for item in loader(data)]
        pools[name] = [t for t in texts if t.strip()]
    rows: list[tuple[str, str]] = []
    for i, name in enumerate(sorted(pools, key=lambda k: len(pools[k]))):
        take = min(len(pools[name]), (n - len(rows)) // (len(pools) - i))
        rows += [(t, name) for t in rng.sample(pools[name], take)]
    if len(rows) < n:
        raise SystemExit(f"{n} rows needed, the datasets give {len(rows)} in shares")
    rng.shuffle(rows)
    return rows


def _index_vectors(encoder: Any, texts: list[str], cache: Path | None, out: dict[str, Any]) -> np.ndarray:
    """The index rows' vectors: from `cache` when it holds these texts under this encoder, else embedded."""
    digest = hashlib.blake2b("\0".join([encoder.name, *texts]).encode("utf-8", "surrogatepass"),
                             digest_size=16).hexdigest()
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            if str(saved["digest"]) == digest:
                out["index_embedding_s"] = "cached"
                return np.asarray(saved["vectors"], dtype=np.float32)
    t = time.perf_counter()
    vectors = np.asarray(encoder.encode(texts), dtype=np.float32)
    out["index_embedding_s"] = round(time.perf_counter() - t, 1)
    if cache is not None:
        np.savez(cache, vectors=vectors, digest=np.asarray(digest))
    return vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="labelled index rows")
    ap.add_argument("--queries", type=int, default=300, help="timed requests per index size")
    ap.add_argument("--encoder", default="minilm-int8")
    ap.add_argument("--k", type=int, default=None, help="category_neighbours_k (default: the setting's)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vectors-cache", type=Path, default=None, help="a .npz file keeping the index rows' vectors")
    ap.add_argument("--embed-only", action="store_true", help="fill --vectors-cache and stop (nothing timed)")
    ap.add_argument("--real-rows", type=int, default=None,
                    help="embed only this many index rows; the rest of the index repeats them with a little "
                    "noise (each a real row's vector plus N(0, 0.03) per dimension, renormalised; same category)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from localroute.embeddings import load_encoder
    from localroute.routing.categories import NeighbourCategories, ResolvedCategory
    from localroute.routing.embedding import EmbeddingModel, train_embedding
    from localroute.routing.prerouter import VectorMemo
    from localroute.settings import Settings
    from localroute.types import GenerationRequest

    defaults = Settings()
    k = args.k if args.k is not None else defaults.category_neighbours_k
    out: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_avg_1m_before": round(os.getloadavg()[0], 2), "encoder": args.encoder,
        "category_neighbours_k": k, "min_similarity": defaults.category_neighbours_min_similarity,
    }
    largest = max(args.sizes)
    real = min(largest, args.real_rows or largest)
    rows = _rows(args.data, real + args.queries, args.seed)
    index_rows, query_rows = rows[:real], rows[real:real + args.queries]

    encoder = load_encoder(args.encoder)
    vectors = _index_vectors(encoder, [text for text, _ in index_rows], args.vectors_cache, out)
    if real < largest:  # jittered copies of the real rows (--real-rows)
        rng = np.random.default_rng(args.seed)
        pick = np.arange(largest - real) % real
        extra = vectors[pick] + rng.normal(0.0, 0.03, size=(len(pick), vectors.shape[1])).astype(np.float32)
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
        vectors = np.concatenate([vectors, extra])
        index_rows = index_rows + [index_rows[i] for i in pick]
        out["real_index_rows"] = real
    if args.embed_only:
        print(json.dumps(out))
        return
    outcomes = np.full((largest, 2), np.nan, dtype=np.float32)  # no tier outcomes: the category index alone

    fallback = ResolvedCategory(defaults.default_category, "default")
    for n in sorted(args.sizes):
        art = train_embedding(vectors[:n], outcomes[:n], ["local", "frontier"], encoder.name,
                              categories=[c for _, c in index_rows[:n]])
        t = time.perf_counter()
        model = EmbeddingModel(art)
        build_s = time.perf_counter() - t
        neighbours = NeighbourCategories(model, encoder, k, defaults.category_neighbours_min_similarity, VectorMemo())
        requests = [GenerationRequest(messages=({"role": "user", "content": text},), request_id=f"bench-{n}-{i}")
                    for i, (text, _) in enumerate(query_rows)]

        async def lookups(neighbours: Any = neighbours, requests: list[Any] = requests) -> tuple[list[float], list[str]]:
            for warm in requests[:5]:
                await neighbours.resolve(GenerationRequest(messages=warm.messages), fallback)
            took, placed = [], []
            for request in requests:
                t0 = time.perf_counter()
                got = await neighbours.resolve(request, fallback)
                took.append(time.perf_counter() - t0)
                placed.append(got.name)
            return took, placed

        took, placed = asyncio.run(lookups())
        embed, search = [], []
        for text, _ in query_rows:
            t0 = time.perf_counter()
            v = encoder.encode([text])[0]
            t1 = time.perf_counter()
            model.nearest_category(v, k, defaults.category_neighbours_min_similarity)
            embed.append(t1 - t0)
            search.append(time.perf_counter() - t1)
        assert model.category_neighbours is not None and model.category_neighbours.index is not None
        out[f"index_{n}"] = {
            "search_method": model.category_neighbours.index.method, "index_build_s": round(build_s, 2),
            "lookup": _stats(took), "embed": _stats(embed), "search_and_vote": _stats(search),
            "placed_in_own_dataset": round(sum(p == c for p, (_, c) in zip(placed, query_rows)) / len(placed), 3),
            "placed_default": round(placed.count(fallback.name) / len(placed), 3),
        }
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2) if args.json else "\n".join(f"{key:24s} {val}" for key, val in out.items()))


if __name__ == "__main__":
    main()
