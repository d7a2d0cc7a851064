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
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(isolation: str, requests: int, max_tokens: int, model: str) -> dict[str, float]:
    import httpx

    from localroute.bench.loadgen import router_overhead
    from localroute.bench.servers import free_port

    port = free_port()
    env = {**os.environ, "LOCALROUTE_ENGINE_ISOLATION": isolation, "LOCALROUTE_N_PARALLEL": "1",
           "LOCALROUTE_TIERS": json.dumps([{"name": "local", "kind": "llama_cpp", "model": model}]),
           "LOCALROUTE_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "localroute", "serve", "--host", "127.0.0.1", "--port",
                               str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        prompts = [f"Name a colour, number {i}." for i in range(50)]
        asyncio.run(router_overhead(f"{base}/v1", "localroute/cascade", prompts, 10, max_tokens))  # warm-up
        samples, _ = asyncio.run(router_overhead(f"{base}/v1", "localroute/cascade", prompts, requests, max_tokens))
    finally:
        server.terminate()
        server.wait(30)
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
