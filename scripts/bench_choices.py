"""n > 1 on the llama.cpp engine: one request for n choices (the prompt prefilled once, its KV
copied to the other choices' sequences, all decoded in one batch) against n separate concurrent
requests for the same prompt with the prefix cache off (each prefills it), SmolLM2.

    python scripts/bench_choices.py [--n 4] [--prompt-words 300] [--max-tokens 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.registry import resolve_model_path
from localroute.settings import Settings
from localroute.types import GenerationRequest, SamplingParams


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    path = resolve_model_path("smollm2-135m", Settings().models_dir)
    engine = LlamaEngine(path, n_ctx_seq=args.n_ctx, n_parallel=args.n, n_threads=2, prefix_cache=False)
    backend = LlamaCppBackend("smollm2", engine)
    text = " ".join(f"word{i % 50}" for i in range(args.prompt_words)) + "\nSummarise the text above."
    base = GenerationRequest(messages=({"role": "user", "content": text},),
                             params=SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=1, ignore_eos=True))
    await backend.generate(base)  # warm-up
    rows: dict[str, list[float]] = {"n choices, one request": [], "n separate requests": []}
    prefilled: dict[str, int] = {}
    for _ in range(args.reps):
        for label, times in rows.items():
            before = engine.stats["prompt_tokens_total"] - engine.stats["prompt_tokens_cached_total"]
            t0 = time.perf_counter()
            if label.startswith("n choices"):
                gen = await backend.generate(replace(base, params=replace(base.params, n=args.n)))
                assert len(gen.choices) == args.n - 1
            else:
                await asyncio.gather(*(backend.generate(replace(base, params=replace(base.params, seed=i)))
                                       for i in range(args.n)))
            times.append(time.perf_counter() - t0)
            prefilled[label] = engine.stats["prompt_tokens_total"] - engine.stats["prompt_tokens_cached_total"] - before
    prompt = len(backend.prompt_tokens(base))
    print(f"SmolLM2-135M Q4_1, n={args.n}, prompt {prompt} tokens, {args.max_tokens} tokens per choice, "
          f"n_ctx_seq {engine.n_ctx_seq}, {args.reps} reps (median)")
    for label, times in rows.items():
        print(f"  {label:24s} {statistics.median(times):7.3f} s   prompt tokens prefilled: {prefilled[label]}")
    engine.close()


if __name__ == "__main__":
    asyncio.run(main())
