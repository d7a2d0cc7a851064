#!/usr/bin/env python3
"""In-process cost of routing one request, without HTTP or decoding: rendering the chat template
and tokenising (with the per-fragment token cache, and with llama.cpp's whole-text tokeniser for
comparison; a new user text every call), pricing the answer (alone, and as one of many 1-s answers
finishing back to back), and running every observer (metrics, routing-log queue).

These are parts of the router overhead (the `router` entry of Server-Timing) that localroute's own
code adds; the rest is the ASGI stack and the hand-offs between the event loop and the engine thread.

    python scripts/bench_overhead.py [--runs 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ms(fn: Callable[[], object], runs: int) -> dict[str, float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))]}


def main() -> int:
    from localroute.monitoring.record import RequestRecord
    from localroute.service import Monitoring, Service, build_tiers
    from localroute.settings import Settings
    from localroute.types import GenerationRequest, SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # the engine in this process: its template and tokeniser are timed here, not across a pipe
        settings = Settings(tiers=[{"name": "local", "kind": "llama_cpp", "model": "smollm2-135m"}], n_ctx=1024,
                            routing_log_path=Path(tmp) / "routing.db", engine_isolation="thread")
        tiers = build_tiers(settings)
        service, monitoring = Service(settings, tiers), Monitoring(settings, tiers)
        backend = tiers[0].backend
        request = GenerationRequest(messages=({"role": "user", "content": "Explain the theory of relativity in "
                                               "simple terms for a child."},),
                                    params=SamplingParams(max_tokens=8, temperature=0.0))
        routed = asyncio.run(service.router("localroute/cascade").route(request))
        started = time.perf_counter()
        record = RequestRecord("r", "chat", "localroute/cascade", False, 200, started, 0.1, 0.01, routed.decision,
                               routed.generation)
        engine = backend.engine  # type: ignore[attr-defined]
        fresh = itertools.count()

        def new_prompt() -> list[int]:  # a new user text every call: only the template's pieces repeat
            text = f"Explain the theory of relativity in simple terms for a child, take {next(fresh)}."
            msg = GenerationRequest(messages=({"role": "user", "content": text},), params=request.params)
            return backend.prompt_tokens(msg)  # type: ignore[attr-defined,no-any-return]

        fragments = engine._fragments
        engine._fragments = None  # llama.cpp's whole-text tokeniser, for comparison
        whole_text = _ms(new_prompt, args.runs)
        engine._fragments = fragments
        result = {
            "template_and_tokenise": _ms(new_prompt, args.runs),
            "template_and_tokenise_whole_text": whole_text,
            "pricing": _ms(lambda: monitoring.price(routed.decision, routed.generation, started), args.runs),
            # 1-s answers finishing back to back, as on a busy server: each window spans the others
            "pricing_back_to_back": _ms(lambda: monitoring.price(routed.decision, routed.generation,
                                                                 time.perf_counter() - 1.0), args.runs * 10),
            "observers": _ms(lambda: [o(record) for o in monitoring.observers], args.runs),
            "loadavg": os.getloadavg(),
        }
        monitoring.close()
        asyncio.run(service.aclose())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("template_and_tokenise", "template_and_tokenise_whole_text", "pricing", "pricing_back_to_back",
                     "observers"):
            print(f"{name:24s} p50 {result[name]['p50_ms']:.3f} ms  p99 {result[name]['p99_ms']:.3f} ms")
        print(f"load average {result['loadavg'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
