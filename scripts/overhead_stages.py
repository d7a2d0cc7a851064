#!/usr/bin/env python3
"""Where the router overhead goes, stage by stage: a `localroute serve` with one SmolLM2 tier whose
request path is stamped from outside, one non-streamed answer at a time; the median of each stage
in milliseconds, beside Server-Timing's `router` for the same answers.

    python scripts/overhead_stages.py process [--requests 200] [--max-tokens 16]
    python scripts/overhead_stages.py thread

Stages, in the order a request meets them:

    arrival -> handler          the middleware stack and the route lookup
    handler -> body read        mostly the wait for the body's bytes (Server-Timing's `body`, not router time)
    body read -> validated      JSON parse, category, pydantic validation
    validated -> tier call      the internal request, the router's choice, the cascade's checks
    tier call -> handed over    (process) the stamp the engine's time starts from
    handed over -> sent         (process) the request's pipe write: engine time, as waking an engine thread is
    engine done -> on the loop  (process) the answer's way back: encode, pipe, the loop's wake-up, decode
    on the loop -> tier return  (process) the waiting call's resumption and the tokens' rebuild
    tier return -> routed       the cascade's confidence, checks and decision
    routed -> priced            the cost ledger (telemetry window, attempt costs)
    priced -> answer            the chat.completion dict
    answer -> response          JSON encoding and the response object
    response -> start           back out through the middleware to the response's start

The stamps wrap localroute's functions in the server process (nothing in localroute changes for
it); their own cost, about 1-2 us each, is inside the figures.
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
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = [
    ("arrival -> handler", "arrive", "handler"),
    ("handler -> body read", "handler", "body_read"),
    ("body read -> validated", "body_read", "validated"),
    ("validated -> tier call", "validated", "tier_call"),
    ("tier call -> handed over", "tier_call", "handed_at"),
    ("handed over -> sent", "handed_at", "sent"),
    ("engine done -> on the loop", "engine_done", "on_loop"),
    ("on the loop -> tier return", "on_loop", "tier_return"),
    ("tier return -> routed", "tier_return", "routed"),
    ("routed -> priced", "routed", "priced"),
    ("priced -> answer", "priced", "answer"),
    ("answer -> response", "answer", "response"),
    ("response -> start", "response", "start"),
]


def _serve(port: int, out: str) -> None:
    """The server process: localroute serve with the stamps, writing them to `out` when it stops."""
    import uvicorn

    from localroute.backends.supervised import SupervisedBackend
    from localroute.routing.cascade import CascadeRouter
    from localroute.server import create_app, serving, timing
    from localroute.server.connections import server_config
    from localroute.service import Monitoring, build_tiers
    from localroute.settings import Settings

    rows: list[dict[str, float]] = []
    cur: dict[str, float] = {}

    def after(owner: Any, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def stamped(*a: Any, **k: Any) -> Any:
            result = fn(*a, **k)
            cur[key] = time.perf_counter()
            return result
        setattr(owner, name, stamped)

    def after_async(owner: Any, name: str, key: str, before: str | None = None) -> None:
        fn = getattr(owner, name)

        async def stamped(*a: Any, **k: Any) -> Any:
            if before is not None:
                cur[before] = time.perf_counter()
            result = await fn(*a, **k)
            cur[key] = time.perf_counter()
            return result
        setattr(owner, name, stamped)

    after_async(serving, "_respond", "_respond_end", before="handler")
    after_async(serving, "read_json", "body_read")
    after(serving, "validate", "validated")
    after_async(CascadeRouter, "route", "routed")
    after(Monitoring, "price", "priced")
    after(serving._Shape, "answer", "answer")
    after(serving.ChatAnswer, "response", "response")

    submit = SupervisedBackend._submit

    def _submit(self: Any, request: Any, stream: bool, put: Any) -> int:
        def on_loop(event: Any) -> None:
            cur["on_loop"] = time.perf_counter()
            put(event)
        return submit(self, request, stream, on_loop)
    SupervisedBackend._submit = _submit  # type: ignore[method-assign]
    send = SupervisedBackend._send

    def _send(self: Any, msg: tuple[Any, ...]) -> None:
        send(self, msg)
        if msg[0] == "submit":
            cur["handed_at"], cur["sent"] = msg[2].handed_at, time.perf_counter()
    SupervisedBackend._send = _send  # type: ignore[method-assign]

    middleware = timing.ServerTimingMiddleware.__call__

    async def outermost(self: Any, scope: Any, receive: Any, send_: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await middleware(self, scope, receive, send_)
            return
        cur.clear()
        cur["arrive"] = time.perf_counter()

        async def stamped_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                cur["start"] = time.perf_counter()
                rows.append(dict(cur))
            await send_(message)
        await middleware(self, scope, receive, stamped_send)
    timing.ServerTimingMiddleware.__call__ = outermost  # type: ignore[method-assign]

    settings = Settings()
    tiers = build_tiers(settings)
    for tier in tiers:  # the tier call and its return, on whichever backend the isolation built
        backend = tier.backend
        generate = backend.generate

        async def stamped_generate(request: Any, generate: Any = generate) -> Any:
            cur["tier_call"] = time.perf_counter()
            gen = await generate(request)
            cur["tier_return"] = time.perf_counter()
            cur["engine_done"] = cur.get("handed_at", cur["tier_call"]) + gen.latency_s
            return gen
        backend.generate = stamped_generate  # type: ignore[method-assign]
    app = create_app(settings, tiers=tiers)
    sys.setswitchinterval(settings.switch_interval_s)
    server = uvicorn.Server(server_config(app, settings.model_copy(update={"port": port, "host": "127.0.0.1"})))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        Path(out).write_text(json.dumps(rows))


def _drive(base: str, requests: int, max_tokens: int) -> list[float]:
    from localroute.bench.loadgen import router_overhead

    prompts = [f"Name a colour, number {i}." for i in range(50)]
    asyncio.run(router_overhead(base, "localroute/cascade", prompts, 10, max_tokens))  # warm-up
    router, _ = asyncio.run(router_overhead(base, "localroute/cascade", prompts, requests, max_tokens))
    return router


def measure(isolation: str, requests: int, max_tokens: int, model: str) -> dict[str, Any]:
    from localroute.bench.servers import ManagedServer, free_port
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    settings = Settings()
    tier = {"name": "local", "kind": "llama_cpp", "model": str(resolve_model_path(model, settings.models_dir))}
    port = free_port()
    env = {"LOCALROUTE_ENGINE_ISOLATION": isolation, "LOCALROUTE_TIERS": json.dumps([tier]),
           "LOCALROUTE_N_PARALLEL": "1", "LOCALROUTE_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stamps.json")
        server = ManagedServer(f"localroute-{isolation}", [sys.executable, __file__, "--serve", str(port), out],
                               "localroute/cascade", env, port)
        server.start()
        try:
            router = _drive(server.base_url, requests, max_tokens)
        finally:
            if server.proc is not None:  # Ctrl-C: uvicorn shuts down and the server writes its stamps
                server.proc.send_signal(signal.SIGINT)  # (after a SIGTERM uvicorn re-raises it and dies)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.proc.wait(60)
            server.stop()
        rows = json.loads(Path(out).read_text())[10:]  # after the warm-up
    stages: dict[str, float | None] = {}
    for label, a, b in STAGES:
        spans = [r[b] - r[a] for r in rows if a in r and b in r]
        stages[label] = statistics.median(spans) * 1e3 if spans else None
    return {"isolation": isolation, "n": len(rows), "router_p50_ms": statistics.median(router) * 1e3,
            "stages_p50_ms": stages, "load": os.getloadavg()[0]}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("isolation", nargs="+", choices=["thread", "process"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for isolation in args.isolation:
        r = measure(isolation, args.requests, args.max_tokens, args.model)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        print(f"{isolation}: {r['n']} answers, Server-Timing router p50 {r['router_p50_ms']:.3f} ms "
              f"(load {r['load']:.2f})")
        for label, ms in r["stages_p50_ms"].items():
            print(f"  {label:28s} {'-' if ms is None else f'{ms:.3f}'}")


if __name__ == "__main__":
    main()
