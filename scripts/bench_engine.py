#!/usr/bin/env python3
"""Engine-only batched decode: N concurrent greedy requests through one LlamaEngine, no HTTP.

Separates the engine's own batched speed from the server's: prints aggregate tokens/s and ms per
decode step for each stream count, with the KV cache per sequence (default) or unified.

    python scripts/bench_engine.py [--streams 1,4] [--tokens 128] [--threads 2] [--kv-unified] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def _run(backend: object, engine: object, streams: int, tokens: int) -> dict[str, float]:
    from localroute.types import GenerationRequest, SamplingParams

    request = GenerationRequest(messages=({"role": "user", "content": "Write a long story about a dragon."},),
                                params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    await asyncio.gather(*(backend.generate(request) for _ in range(streams)))  # type: ignore[attr-defined]
    steps0 = engine.stats["decode_steps_total"]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    gens = await asyncio.gather(*(backend.generate(request) for _ in range(streams)))  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    steps = engine.stats["decode_steps_total"] - steps0  # type: ignore[attr-defined]
    return {"streams": streams, "tokens_per_s": sum(g.completion_tokens for g in gens) / dt,
            "ms_per_step": dt / max(steps, 1) * 1e3}


def main() -> int:
    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-unified", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    engine = LlamaEngine(resolve_model_path(args.model, Settings().models_dir), n_ctx_seq=512,
                         n_parallel=max(levels), n_threads=args.threads, kv_unified=args.kv_unified)
    backend = LlamaCppBackend("bench", engine)
    try:
        rows = [asyncio.run(_run(backend, engine, n, args.tokens)) for n in levels]
    finally:
        engine.close()
    result = {"kv_unified": args.kv_unified, "threads": args.threads, "tokens": args.tokens,
              "loadavg": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"kv_unified={args.kv_unified} threads={args.threads} load={result['loadavg'][0]:.2f}")
        for r in rows:
            print(f"streams={r['streams']:>3}  {r['tokens_per_s']:7.1f} tok/s  {r['ms_per_step']:6.1f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
