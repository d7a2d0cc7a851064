#!/usr/bin/env python3
"""Engine-only batched decode: N concurrent greedy requests through one LlamaEngine, no HTTP.

Separates the engine's own batched speed from the server's: prints aggregate tokens/s and ms per
decode step for each stream count, with the KV cache per sequence (default) or unified.
`--prefill-chunks 16,32,128` measures prompt processing instead: prompt tokens/s for each chunk size
and how long one chunk takes, which is how long a newcomer's chunk stalls the running streams
(settings.prefill_chunk).

    python scripts/bench_engine.py [--streams 1,4] [--tokens 128] [--threads 2] [--kv-unified] [--json]
    python scripts/bench_engine.py --prefill-chunks 16,32,64,128 [--prompt-words 60]
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


def _prefill(model: Path, chunk: int, threads: int, words: int, runs: int = 4) -> dict[str, float]:
    """Prompt tokens/s with prompts fed `chunk` tokens per llama_decode (median of `runs` prompts),
    from the engine's own prefill counters."""
    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.types import GenerationRequest, SamplingParams

    engine = LlamaEngine(model, n_ctx_seq=2048, n_parallel=1, n_batch=chunk, n_threads=threads,
                         prefill_chunk=chunk, prefix_cache=False)
    backend = LlamaCppBackend("bench", engine)
    text = " ".join(f"word{i}" for i in range(words))
    rates = []
    try:
        for i in range(runs + 1):  # the first is a warm-up
            before = dict(engine.stats)
            request = GenerationRequest(prompt=f"{i} {text}", params=SamplingParams(max_tokens=1, temperature=0.0))
            asyncio.run(backend.generate(request))
            tokens = engine.stats["prompt_tokens_total"] - before["prompt_tokens_total"]
            ns = engine.stats["prefill_ns_total"] - before["prefill_ns_total"]
            if i:
                rates.append(tokens / (ns / 1e9))
    finally:
        engine.close()
    rate = sorted(rates)[len(rates) // 2]
    return {"chunk": chunk, "prompt_tokens": tokens, "prefill_tokens_per_s": rate, "ms_per_chunk": chunk / rate * 1e3}


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
    p.add_argument("--prefill-chunks", default=None, help="e.g. 16,32,128: prompt speed per chunk size instead")
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.prefill_chunks:
        model = resolve_model_path(args.model, Settings().models_dir)
        prefill = [_prefill(model, int(c), args.threads, args.prompt_words) for c in args.prefill_chunks.split(",")]
        if args.json:
            print(json.dumps({"threads": args.threads, "loadavg": os.getloadavg(), "prefill": prefill}, indent=2))
        else:
            print(f"threads={args.threads} load={os.getloadavg()[0]:.2f} prompt={prefill[0]['prompt_tokens']} tokens")
            for r in prefill:
                print(f"chunk={r['chunk']:>4}  {r['prefill_tokens_per_s']:6.0f} prompt tok/s  "
                      f"{r['ms_per_chunk']:6.1f} ms per chunk")
        return 0
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
