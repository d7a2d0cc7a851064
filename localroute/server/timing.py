"""Router overhead, measured where it happens: `Server-Timing` on every non-streaming answer.

The handler records how long the engines worked on a request (`request.state.engine_s`: the sum of
its tier attempts, each from the moment the tier got the request: for a local tier that includes
its chat template and tokenising, which every engine server does inside its own time). This
middleware, outermost, knows when the request arrived and when its response starts, and how long the
app sat waiting for the request body's bytes (a client such as httpx sends the headers and the body
in separate writes, and the app starts on the headers; under load that wait also holds the time the
request's task then waits for its turn on the event loop). What is left is what localroute itself
added: auth, body limits, parsing, routing, pricing, serialisation and the hand-offs between the
engine thread and the event loop. The client's own HTTP stack and the network are not in it: they
are the same in front of any engine. Streams get no header (it leaves before the engine is done).

    Server-Timing: engine;dur=812.402, body;dur=0.201, router;dur=0.731
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Observer = Callable[[float], None]


class ServerTimingMiddleware:
    """Pure ASGI (no extra task per request); `observe` gets each overhead in seconds."""

    def __init__(self, app: Any, observe: Callable[[], Observer | None] = lambda: None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        body_wait = 0.0

        async def timed_receive() -> Any:
            nonlocal body_wait
            t0 = time.perf_counter()
            message = await receive()
            if message["type"] == "http.request":  # not the disconnect watcher's wait, which lasts
                body_wait += time.perf_counter() - t0
            return message

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.start" and (engine_s := state.get("engine_s")) is not None:
                overhead = max(0.0, time.perf_counter() - arrived - engine_s - body_wait)
                value = (f"engine;dur={engine_s * 1e3:.3f}, body;dur={body_wait * 1e3:.3f}, "
                         f"router;dur={overhead * 1e3:.3f}").encode()
                message = {**message, "headers": [*message.get("headers", ()), (b"server-timing", value)]}
                await send(message)
                if (observe := self.observe()) is not None:
                    observe(overhead)
                return
            await send(message)

        await self.app(scope, timed_receive, timed_send)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`engine;dur=1.5, router;dur=0.2` -> {"engine": 1.5, "router": 0.2} (milliseconds)."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out
