#!/usr/bin/env python3
"""Router overhead with the shared state on: Redis budget reservations and per-key rate limits.

A real server (create_app, uvicorn on 127.0.0.1) with the frontier alone as its ladder, the
frontier the zero-delay stand-in of tests/fault_upstream.py, a budget and a default rate limit
(requests/min, tokens/min, concurrent) for every key. Requests are sent one at a time.

What is counted as overhead: the `router` entry of Server-Timing (auth, the rate-limit script at
the edge, parsing, routing, the budget's reservation, pricing, serialisation). The reservation is
in it: a frontier attempt's engine time starts after its reservation (openai_http
`_generate_once`), so Server-Timing's `engine` never holds it. It is also timed here around the
budget's call and printed as a part of the overhead, not added to it. (The settle, the lease's
release and the token count run after the answer.)
The same run without Redis (in-process budget and limits) is printed beside it.

    python scripts/bench_shared_state.py [--requests 300] [--redis-url redis://...] [--json]

Without --redis-url a throwaway redis-server is started (tests/services.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    import uvicorn

    from tests.services import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(upstream_url: str, redis_url: str | None, n: int) -> dict[str, Any]:
    import httpx

    from localroute.server.app import create_app
    from localroute.settings import Settings

    settings = Settings(
        tiers=[
            {
                "name": "frontier",
                "kind": "openai",
                "model": "gpt-test",
                "base_url": upstream_url,
                "input_usd_per_mtok": 1.0,
                "output_usd_per_mtok": 1.0,
            }
        ],
        api_keys="sk-bench-0123456789",
        redis_url=redis_url,
        budget_usd=1e6,
        budget_state_path=None,
        rate_limit_default={"requests_per_min": 10**7, "tokens_per_min": 10**9, "concurrent": 1000},
        routing_log_path=None,
        frontier_max_retries=0,
    )
    app = create_app(settings)
    budget_s: list[float] = []
    router_s: list[float] = []
    with _serve(app) as base, httpx.Client(headers={"Authorization": "Bearer sk-bench-0123456789"}) as client:
        budget = app.state.service.budget
        if budget is not None:  # time the budget's reservation (in Redis, or in process)
            reserve = budget.areserve

            async def timed_reserve(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await reserve(*a, **kw)
                finally:
                    budget_s.append(time.perf_counter() - t)

            budget.areserve = timed_reserve  # type: ignore[method-assign]
        body = {
            "model": "localroute/cascade",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        }
        for i in range(n + 20):
            r = client.post(f"{base}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            if "x-localroute-shared-state" in r.headers:
                raise SystemExit(
                    "Redis fell back to local state during the bench: "
                    + r.headers["x-localroute-shared-state"]
                )
            timing = dict(
                part.split(";dur=") for part in r.headers["server-timing"].replace(" ", "").split(",")
            )
            if i >= 20:  # warm-up: connections, script loading
                router_s.append(float(timing["router"]) / 1000)
            elif budget_s:
                budget_s.pop()
    reserve = budget_s[-n:] if budget_s else [0.0] * n
    return {
        "requests": n,
        "shared": redis_url is not None,
        "overhead_p50_ms": round(statistics.median(router_s) * 1000, 3),
        "overhead_p99_ms": round(_pct(router_s, 0.99) * 1000, 3),
        "budget_reserve_p50_ms": round(statistics.median(reserve) * 1000, 3),
    }


def main() -> int:
    from tests.fault_upstream import Fault, FaultUpstream
    from tests.services import redis_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--redis-url", default=None, help="an existing Redis (default: a throwaway redis-server)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with FaultUpstream(Fault(prompt_tokens=10, completion_tokens=5)) as up:
        ctx = nullcontext(args.redis_url) if args.redis_url else redis_server()
        with ctx as server:
            url = server if isinstance(server, str) else server.url
            shared = run(up.url, url, args.requests)
        local = run(up.url, None, args.requests)
    out = {"redis": shared, "in_process": local}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, r in out.items():
            print(
                f"{name:10s} overhead (Server-Timing router) p50 {r['overhead_p50_ms']:.3f} ms  "
                f"p99 {r['overhead_p99_ms']:.3f} ms  (of which the budget's reservation p50 "
                f"{r['budget_reserve_p50_ms']:.3f} ms)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
