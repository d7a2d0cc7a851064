#!/usr/bin/env python3
"""Engine-only batched decode: N concurrent greedy requests through one LlamaEngine, no HTTP.

Separates the engine's own batched speed from the server's: prints aggregate tokens/s and ms per
decode step for each stream count, with the KV cache per sequence (default) or unified.
`--prefill-chunks 16,32,128` measures prompt processing instead: prompt tokens/s for each chunk size
and how long one chunk takes, which is how long a newcomer's chunk stalls the running streams
(settings.prefill_chunk).
`--extra-buffers on,off` compares llama.cpp's extra weight buffer types (REPACK; AMX where the CPU
has it) per model: prompt tok/s (an idle engine, the whole prompt in one llama_decode), decode tok/s
at 1 and 4 streams, and whether a greedy answer's tokens and logprobs change. Every (model, mode)
runs in a fresh process, the modes interleaved and their order flipped each round; medians over
rounds. This is the measurement behind settings.llama_extra_buffers=auto (README).

    python scripts/bench_engine.py [--streams 1,4] [--tokens 128] [--threads 2] [--kv-unified] [--json]
    python scripts/bench_engine.py --stream --stop '<|never|>' --tokens 1024   # the per-token text path
    python scripts/bench_engine.py --prefill-chunks 16,32,64,128 [--prompt-words 60]
    python scripts/bench_engine.py --extra-buffers on,off [--models smollm2-135m,gemma-3-270m] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def _run(backend: object, engine: object, streams: int, tokens: int, stream: bool = False,
               stop: tuple[str, ...] = ()) -> dict[str, float]:
    """`stream`: read the answers as streams (every token's text goes through the stop-string
    holdback); `stop`: stop strings that never match, searched for at every token."""
    from localroute.types import Generation, GenerationRequest, SamplingParams

    request = GenerationRequest(messages=({"role": "user", "content": "Write a long story about a dragon."},),
                                params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                                      stop=list(stop)))

    async def one() -> Generation:
        if not stream:
            return await backend.generate(request)  # type: ignore[attr-defined,no-any-return]
        final = None
        async for delta in backend.stream(request):  # type: ignore[attr-defined]
            final = delta.final or final
        assert final is not None
        return final

    await asyncio.gather(*(one() for _ in range(streams)))
    steps0 = engine.stats["decode_steps_total"]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    gens = await asyncio.gather(*(one() for _ in range(streams)))
    dt = time.perf_counter() - t0
    steps = engine.stats["decode_steps_total"] - steps0  # type: ignore[attr-defined]
    return {"streams": streams, "tokens_per_s": sum(g.completion_tokens for g in gens) / dt,
            "ms_per_step": dt / max(steps, 1) * 1e3}


def _prefill(model: Path, chunk: int, threads: int, words: int, runs: int = 4) -> dict[str, float]:
    """Prompt tokens/s with prompts fed `chunk` tokens per llama_decode (median of `runs` prompts),
    from the engine's own prefill counters."""
    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.settings import Settings
    from localroute.types import GenerationRequest, SamplingParams

    engine = LlamaEngine(model, n_ctx_seq=2048, n_parallel=1, n_batch=chunk, n_threads=threads,
                         prefill_chunk=chunk, prefix_cache=False, extra_buffers=Settings().llama_extra_buffers)
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


PROBE = "What is the capital of France?"


def _buffers_variant(model: Path, mode: str, threads: int, tokens: int, words: int, repeats: int) -> dict[str, Any]:
    """One (model, extra-buffers mode) in this process: prompt and decode speed, and a greedy probe."""
    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.types import GenerationRequest, SamplingParams

    engine = LlamaEngine(model, n_ctx_seq=1024, n_parallel=4, n_threads=threads, prefix_cache=False,
                         extra_buffers=mode)
    backend = LlamaCppBackend("bench", engine)
    text = " ".join(f"word{i}" for i in range(words))
    out: dict[str, Any] = {"use_extra_bufts": engine.extra_buffers.use_extra_bufts, "prefill": [], "decode_1": [],
                           "decode_4": []}
    try:
        for i in range(repeats + 1):  # the first is a warm-up
            before = dict(engine.stats)
            asyncio.run(backend.generate(GenerationRequest(prompt=f"{i} {text}", params=SamplingParams(
                max_tokens=1, temperature=0.0))))
            n = engine.stats["prompt_tokens_total"] - before["prompt_tokens_total"]
            ns = engine.stats["prefill_ns_total"] - before["prefill_ns_total"]
            if i:
                out["prefill"].append(n / (ns / 1e9))
        out["prompt_tokens"] = n
        for _ in range(repeats):
            out["decode_1"].append(asyncio.run(_run(backend, engine, 1, tokens))["tokens_per_s"])
            out["decode_4"].append(asyncio.run(_run(backend, engine, 4, tokens))["tokens_per_s"])
        gen = asyncio.run(backend.generate(GenerationRequest(messages=({"role": "user", "content": PROBE},),
                                                             params=SamplingParams(max_tokens=24, temperature=0.0))))
        out["probe"] = {"text": gen.text, "token_ids": [t.token_id for t in gen.tokens],
                        "logprobs": [t.logprob for t in gen.tokens]}
    finally:
        engine.close()
    return out


def _exit_reason(returncode: int) -> str:
    """`-11` -> "SIGSEGV (exit -11)": how a child process ended."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"{signal.Signals(-returncode).name} (exit {returncode})"
    return f"exit {returncode}"


def _compare_buffers(args: argparse.Namespace) -> int:
    from localroute.backends.cpu_features import extra_buffers_choice, system_info
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    modes = args.extra_buffers.split(",")
    models = args.models.split(",")
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, b): [] for m in models for b in modes}
    crashes: dict[tuple[str, str], str] = {}  # (model, mode) -> how a process of it ended
    for rnd in range(args.rounds):
        for model in models:
            path = resolve_model_path(model, Settings().models_dir)
            for mode in modes if rnd % 2 == 0 else modes[::-1]:
                done = subprocess.run([sys.executable, __file__, "--buffers-variant", mode, "--model", str(path),
                                       "--threads", str(args.threads), "--tokens", str(args.tokens),
                                       "--prompt-words", str(args.prompt_words), "--repeats", str(args.repeats)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:  # e.g. SIGSEGV with AMX buffers: a result, not the end of the bench
                    crashes[(model, mode)] = _exit_reason(done.returncode)
                    continue
                runs[(model, mode)].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows: list[dict[str, Any]] = [{"model": model, "mode": mode, "crashed": reason} for (model, mode), reason in crashes.items()
            if not runs[(model, mode)]]
    for (model, mode), got in runs.items():
        if not got:
            continue
        row: dict[str, Any] = {"model": model, "mode": mode, "use_extra_bufts": got[0]["use_extra_bufts"],
                               "prompt_tokens": got[0]["prompt_tokens"], "crashed": crashes.get((model, mode))}
        for key in ("prefill", "decode_1", "decode_4"):
            row[f"{key}_runs"] = [v for g in got for v in g[key]]
            row[f"{key}_tokens_per_s"] = statistics.median(row[f"{key}_runs"])
        row["probe"] = got[0]["probe"]
        rows.append(row)
    measured = [r for r in rows if "prefill_tokens_per_s" in r]
    for row in measured:  # each mode against the first measured mode of the same model
        ref = next(r for r in measured if r["model"] == row["model"])
        for key in ("prefill", "decode_1", "decode_4"):
            row[f"{key}_vs_{ref['mode']}"] = row[f"{key}_tokens_per_s"] / ref[f"{key}_tokens_per_s"]
        same = row["probe"]["token_ids"] == ref["probe"]["token_ids"]
        row["probe_same_tokens"] = same
        row["probe_max_logprob_diff"] = (max((abs(a - b) for a, b in zip(row["probe"]["logprobs"],
                                                                          ref["probe"]["logprobs"], strict=True)),
                                             default=0.0) if same else None)
    auto = extra_buffers_choice("auto")
    result = {"threads": args.threads, "tokens": args.tokens, "rounds": args.rounds, "repeats": args.repeats,
              "system_info": system_info(), "auto": {"use_extra_bufts": auto.use_extra_bufts, "reason": auto.reason},
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"threads={args.threads} rounds={args.rounds}x{args.repeats} load {load_before[0]:.2f} -> "
          f"{result['loadavg_after'][0]:.2f}\n{result['system_info']}\nauto: {auto.reason}")
    print(f"{'model':16s} {'mode':4s} {'prompt tok/s':>12s} {'decode 1':>9s} {'decode 4':>9s}  probe vs the first measured mode")
    for r in rows:
        if "prefill_tokens_per_s" not in r:
            print(f"{r['model']:16s} {r['mode']:4s} crashed: {r['crashed']} (every process of this mode)")
            continue
        probe = ("same tokens, max |dlogprob| " + f"{r['probe_max_logprob_diff']:.2g}" if r["probe_same_tokens"]
                 else "DIFFERENT tokens")
        print(f"{r['model']:16s} {r['mode']:4s} {r['prefill_tokens_per_s']:12.0f} {r['decode_1_tokens_per_s']:9.1f} "
              f"{r['decode_4_tokens_per_s']:9.1f}  {probe}")
    return 0


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
    p.add_argument("--stream", action="store_true", help="read answers as streams (per-token text and holdback)")
    p.add_argument("--stop", action="append", default=[], help="a stop string that never occurs (repeatable)")
    p.add_argument("--prefill-chunks", default=None, help="e.g. 16,32,128: prompt speed per chunk size instead")
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--extra-buffers", default=None, help="e.g. on,off: compare llama.cpp's extra buffer types")
    p.add_argument("--models", default="smollm2-135m,gemma-3-270m", help="with --extra-buffers")
    p.add_argument("--rounds", type=int, default=5, help="with --extra-buffers: processes per (model, mode)")
    p.add_argument("--repeats", type=int, default=3, help="with --extra-buffers: timed runs per process")
    p.add_argument("--buffers-variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.buffers_variant is not None:  # child process of --extra-buffers
        print(json.dumps(_buffers_variant(Path(args.model), args.buffers_variant, args.threads, args.tokens,
                                          args.prompt_words, args.repeats)))
        return 0
    if args.extra_buffers:
        return _compare_buffers(args)
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
    settings = Settings()
    engine = LlamaEngine(resolve_model_path(args.model, settings.models_dir), n_ctx_seq=max(512, args.tokens + 64),
                         n_parallel=max(levels), n_threads=args.threads, kv_unified=args.kv_unified,
                         extra_buffers=settings.llama_extra_buffers)
    backend = LlamaCppBackend("bench", engine)
    try:
        rows = [asyncio.run(_run(backend, engine, n, args.tokens, args.stream, tuple(args.stop))) for n in levels]
    finally:
        engine.close()
    result = {"kv_unified": args.kv_unified, "threads": args.threads, "tokens": args.tokens, "stream": args.stream,
              "stop": args.stop, "loadavg": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"kv_unified={args.kv_unified} threads={args.threads} stream={args.stream} stop={args.stop} "
              f"load={result['loadavg'][0]:.2f}")
        for r in rows:
            print(f"streams={r['streams']:>3}  {r['tokens_per_s']:7.1f} tok/s  {r['ms_per_step']:6.1f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
