"""Router decision latency on this CPU: embedding a ~100-token query, then deciding from the index.

    .venv/bin/python scripts/bench_router.py [--json] [--index-size 100000] [--runs 200]

Reports p50/p99 of: MiniLM embedding of a 100-token query (target p50 <= 10 ms; `minilm` with 1 and 2
threads and `minilm-int8` with 2, one session at a time), the embedding
router's decision with an index of `--index-size` queries through HNSW (target p50 <= 1 ms) and by
numpy brute force (why the ANN exists), the classifier's decision, and SmolLM2's own-representation
embedding for comparison. The index holds random unit vectors (no cluster structure: the hard case
for HNSW recall); outcomes are random. Prints the CPU and the 1-minute load average: figures taken
while other work runs on the machine are not representative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn: Callable[[], Any], runs: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "runs": runs}


def _query_of_tokens(encoder: Any, n: int) -> str:
    words = ["the", "router", "decides", "which", "model", "answers", "each", "query", "from", "its", "text", "alone", "before", "any", "inference", "so", "the", "cheap", "model", "runs", "only", "when", "it", "is", "likely", "to", "be", "good", "enough"]
    text, i = "", 0
    while encoder.n_tokens(text) < n:
        text += words[i % len(words)] + " "
        i += 1
    return text.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index-size", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 encoder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from localroute.embeddings.minilm import MiniLMEncoder, MiniLMInt8Encoder
    from localroute.routing.classifier import ClassifierModel, train_classifier
    from localroute.routing.embedding import EmbeddingModel, train_embedding

    out: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_avg_1m_before": round(os.getloadavg()[0], 2), "index_size": args.index_size,
    }
    minilm = MiniLMEncoder()
    query = _query_of_tokens(minilm, args.tokens)
    out["query_tokens"] = minilm.n_tokens(query)
    v = minilm.encode([query])[0]
    # One onnxruntime session at a time: an idle session's intra-op threads spin for a while after
    # each run and would slow the next session's run (interleaving three sessions doubled the times).
    questions = ROOT.parent / "shared" / "data" / "mt_bench" / "question.jsonl"
    if questions.is_file():  # how far the int8 vector space is from minilm's, on real questions
        texts = [json.loads(line)["turns"][0] for line in questions.read_text().splitlines() if line.strip()]
        cos = (MiniLMInt8Encoder(n_threads=2).encode(texts) * minilm.encode(texts)).sum(axis=1)
        out["minilm_int8_cosine_to_minilm_mt_bench"] = {"mean": round(float(cos.mean()), 4),
                                                        "min": round(float(cos.min()), 4), "n": len(texts)}
    for key, make in (("minilm_int8_embed_2_threads", lambda: MiniLMInt8Encoder(n_threads=2)),
                      ("minilm_embed_2_threads", lambda: MiniLMEncoder(n_threads=2)),
                      ("minilm_embed", lambda: minilm)):
        enc = make()
        out[key] = _timed(lambda enc=enc: enc.encode([query]), args.runs)
        del enc

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.index_size, minilm.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (rng.random((args.index_size, 2)) < 0.7).astype(np.float32)
    art = train_embedding(x, y, ["cheap", "strong"], "minilm", k=20)
    t = time.perf_counter()
    hnsw = EmbeddingModel(art)
    out["hnsw_build_s"] = round(time.perf_counter() - t, 2)
    out["decision_method"] = hnsw.index.method
    out["embedding_decision"] = _timed(lambda: hnsw.score(v), args.runs * 5)
    brute = EmbeddingModel(art, brute_force_max=args.index_size + 1)
    out["embedding_decision_brute_force"] = _timed(lambda: brute.score(v), max(20, args.runs // 4))
    small = EmbeddingModel(train_embedding(x[:4096], y[:4096], ["cheap", "strong"], "minilm", k=20))
    out["embedding_decision_brute_force_4096"] = _timed(lambda: small.score(v), args.runs * 5)
    clf = ClassifierModel(train_classifier(x[:2000], y[:2000], ["cheap", "strong"], "minilm"))
    out["classifier_decision"] = _timed(lambda: clf.score(v), args.runs * 5)
    out["minilm_int8_embed_plus_hnsw_decision_p50_ms"] = round(
        out["minilm_int8_embed_2_threads"]["p50_ms"] + out["embedding_decision"]["p50_ms"], 3)
    if not args.no_smollm2:
        from localroute.embeddings.llama import LlamaEncoder
        from localroute.settings import load_settings

        smol = LlamaEncoder(extra_buffers=load_settings().llama_extra_buffers)
        out["smollm2_embed"] = _timed(lambda: smol.encode([query]), max(20, args.runs // 4))
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, val in out.items():
        print(f"{k:45s} {val}")


if __name__ == "__main__":
    main()
