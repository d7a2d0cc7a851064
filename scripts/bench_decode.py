"""Single-stream decode speed: localroute's local tier (confidence on) against llama-cpp-python.

Three ways to produce up to N greedy tokens with the same GGUF, threads and prompt (greedy, so all
three produce the same tokens; the prompt asks for a long answer; no logit_bias to suppress EOS, as
llama-cpp-python applies it in Python at every step and that would measure the bias, not decode):
  llama-cpp-python plain        Llama.create_chat_completion, no logprobs
  llama-cpp-python logprobs     Llama(logits_all=True).create_chat_completion(logprobs, top_logprobs=K)
  localroute (confidence on)    LlamaCppBackend.generate with top_logprobs=K, as the cascade calls it
Target (issue #2): localroute >= 0.95x llama-cpp-python plain.

    python scripts/bench_decode.py [--tokens 128] [--threads 2] [--repeats 3] [--extra-buffers auto] [--json]

Every variant loads the model with the same llama.cpp extra-buffer choice (settings.llama_extra_buffers,
or --extra-buffers), printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _llama_cpp_python(model: Path, threads: int, tokens: int, repeats: int, logprobs: int | None,
                      extra_buffers: str) -> tuple[list[float], int]:
    from localroute.backends.cpu_features import extra_buffers_choice, llama_class

    Llama = llama_class(extra_buffers_choice(extra_buffers).use_extra_bufts)
    llm = Llama(str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, logits_all=logprobs is not None,
                verbose=False)
    rates = []
    for i in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        out: Any = llm.create_chat_completion(
            [{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0.0,
            logprobs=logprobs is not None, top_logprobs=logprobs)
        dt = time.perf_counter() - t0
        n = int(out["usage"]["completion_tokens"])
        if i > 0:  # the first run is the warm-up
            rates.append(n / dt)
    del llm
    return rates, n


def _localroute(model: Path, threads: int, tokens: int, repeats: int, top_logprobs: int,
                extra_buffers: str) -> tuple[list[float], int]:
    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.types import GenerationRequest, SamplingParams

    engine = LlamaEngine(model, n_ctx_seq=1024, n_parallel=1, n_threads=threads, extra_buffers=extra_buffers)
    backend = LlamaCppBackend("bench", engine)
    request = GenerationRequest(messages=({"role": "user", "content": PROMPT},), params=SamplingParams(
        max_tokens=tokens, temperature=0.0, top_logprobs=top_logprobs))
    rates = []
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            gen = asyncio.run(backend.generate(request))
            dt = time.perf_counter() - t0
            if i > 0:
                rates.append(gen.completion_tokens / dt)
    finally:
        engine.close()
    return rates, gen.completion_tokens


def main() -> int:
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="default: localroute's n_threads setting")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and round (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant in a fresh process")
    p.add_argument("--top-logprobs", type=int, default=5)
    p.add_argument("--extra-buffers", choices=["auto", "on", "off"], default=None,
                   help="llama.cpp extra buffer types for every variant (default: settings.llama_extra_buffers)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--variant", choices=["plain", "logprobs", "localroute"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = Settings()
    model = resolve_model_path(args.model, settings.models_dir)
    threads = args.threads or settings.n_threads
    buffers = args.extra_buffers or settings.llama_extra_buffers

    if args.variant is not None:  # child process: run one variant, print its rates as JSON
        fn = {"plain": lambda: _llama_cpp_python(model, threads, args.tokens, args.repeats, None, buffers),
              "logprobs": lambda: _llama_cpp_python(model, threads, args.tokens, args.repeats, args.top_logprobs,
                                                    buffers),
              "localroute": lambda: _localroute(model, threads, args.tokens, args.repeats, args.top_logprobs,
                                                buffers),
              }[args.variant]
        print(json.dumps(fn()))
        return 0
    # Each variant runs in a fresh process: a llama.cpp model freed earlier in the same process
    # measurably slows whatever runs after it (about a third here), which would bias the order.
    runs = {
        "llama-cpp-python plain": "plain",
        "llama-cpp-python logits_all logprobs": "logprobs",
        "localroute (confidence on)": "localroute",
    }
    # Rounds interleave the variants (A B C A B C ...) so that drift in the machine's speed, which is
    # large on a shared VM, hits every variant alike; the median is over all rounds' timed runs.
    measured: dict[str, tuple[list[float], int]] = {name: ([], 0) for name in runs}
    for _ in range(args.rounds):
        for name, variant in runs.items():
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", str(model),
                                  "--tokens", str(args.tokens), "--threads", str(threads), "--repeats",
                                  str(args.repeats), "--top-logprobs", str(args.top_logprobs),
                                  "--extra-buffers", buffers],
                                 capture_output=True, text=True, check=True)
            got, n = json.loads(out.stdout.strip().splitlines()[-1])
            measured[name] = (measured[name][0] + got, n)
    rows = []
    for name, (rates, n_tokens) in measured.items():
        rows.append({"variant": name, "tokens_per_s": statistics.median(rates), "runs": rates,
                     "completion_tokens": n_tokens})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_plain"] = row["tokens_per_s"] / base
    from localroute.backends.cpu_features import extra_buffers_choice

    choice = extra_buffers_choice(buffers)
    result = {
        "model": model.name, "threads": threads, "tokens": args.tokens, "repeats": args.repeats, "rounds": args.rounds,
        "extra_buffers": {"mode": buffers, "use_extra_bufts": choice.use_extra_bufts, "reason": choice.reason},
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows, "target": "localroute >= 0.95x plain", "target_met": rows[2]["vs_plain"] >= 0.95,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{model.name}, {threads} threads, {args.tokens} greedy tokens, median of {args.rounds}x{args.repeats} runs "
          f"(load average {result['loadavg'][0] if result['loadavg'] else 'n/a'})")
    print(f"extra buffer types {'on' if choice.use_extra_bufts else 'off'}: {choice.reason}")
    print(f"{'variant':40s} {'tokens':>6s} {'tok/s':>8s} {'vs plain':>9s}")
    for row in rows:
        print(f"{row['variant']:40s} {row['completion_tokens']:6d} {row['tokens_per_s']:8.1f} "
              f"{row['vs_plain']:8.2f}x")
    print(f"target localroute >= 0.95x plain: {'met' if result['target_met'] else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
