#!/usr/bin/env python3
"""Router overhead (Server-Timing `router`, non-streamed local answers, one at a time) of a
`localroute serve` with one SmolLM2 tier, for each engine isolation given, each in its own server:

    python scripts/overhead_by_isolation.py thread process [--requests 150] [--max-tokens 16]

(`localroute bench --vs localroute-thread --overhead-requests N` measures the same inside the
bench; this script is the short form, one isolation after the other, for interleaved repeats.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(isolation: str, requests: int, max_tokens: int, model: str) -> dict[str, float]:
    from localroute.bench.loadgen import router_overhead
    from localroute.bench.servers import EngineSpec, localroute_server
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    settings = Settings()
    spec = EngineSpec(resolve_model_path(model, settings.models_dir), settings.n_threads, settings.n_ctx)
    server = localroute_server(spec, 1, isolation=isolation)  # the bench's own server, one slot
    server.start()
    try:
        prompts = [f"Name a colour, number {i}." for i in range(50)]
        asyncio.run(router_overhead(server.base_url, server.model, prompts, 10, max_tokens))  # warm-up
        samples, _ = asyncio.run(router_overhead(server.base_url, server.model, prompts, requests, max_tokens))
    finally:
        server.stop()
    samples.sort()
    return {"n": len(samples), "p50_ms": statistics.median(samples) * 1e3,
            "p90_ms": samples[int(len(samples) * 0.9)] * 1e3, "p99_ms": samples[int(len(samples) * 0.99)] * 1e3,
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("isolation", nargs="+", choices=["thread", "process"])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    for isolation in args.isolation:
        r = measure(isolation, args.requests, args.max_tokens, args.model)
        print(f"{isolation}: n={r['n']} router overhead p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f}, "
              f"p99 {r['p99_ms']:.2f} (load {r['load']:.2f})", flush=True)


if __name__ == "__main__":
    main()
