"""Per-key rate limits at the ASGI edge, and the `x-localroute-shared-state` flag.

Runs inside the auth middleware (it needs the key id) and before any body is read: a refused
request costs one Redis script call. A limit reached is OpenAI's 429 `rate_limit_exceeded` with
Retry-After; Redis unavailable under `fail_closed` is a 503 `shared_state_unavailable` with
Retry-After. Whatever fell back to this process's own counters while a request was served
(`fail_open`: its rate limit, its budget reservation) is named in the response's
`x-localroute-shared-state: local; parts=...` header.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from localroute.backends.budget import current_key_id
from localroute.errors import LocalrouteError
from localroute.server.errors import api_for_path, error_response
from localroute.shared_state import RequestFlags, request_flags

__all__ = ["LIMITED_PATHS", "SharedStateMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# the endpoints that generate (and so count against a key's limits)
LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})


class SharedStateMiddleware:
    """Pure ASGI. The Service (and its rate limiter) is read from the app's state per request,
    because it is built in the lifespan, after the middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = getattr(scope["app"].state, "service", None) if "app" in scope else None
        limiter = getattr(service, "rate_limiter", None)
        if service is None or (limiter is None and getattr(service, "shared_state", None) is None):
            await self.app(scope, receive, send)
            return
        flags = RequestFlags()
        token = request_flags.set(flags)
        admission = None
        try:
            path = scope.get("path", "")
            if limiter is not None and scope.get("method") == "POST" and path in LIMITED_PATHS:
                try:
                    admission = await limiter.admit(current_key_id.get(), uuid.uuid4().hex)
                except LocalrouteError as exc:
                    await _flagged(error_response(exc, api_for_path(path)), flags)(scope, receive, send)
                    return

            async def flagged_send(message: Message) -> None:
                if message["type"] == "http.response.start" and flags.local:
                    headers = list(message.get("headers") or [])
                    headers.append(
                        (
                            b"x-localroute-shared-state",
                            f"local; parts={','.join(sorted(flags.local))}".encode(),
                        )
                    )
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, flagged_send)
        finally:
            request_flags.reset(token)
            if admission is not None and limiter is not None:
                await limiter.release(admission)


def _flagged(response: Any, flags: RequestFlags) -> Any:
    if flags.local:
        response.headers["x-localroute-shared-state"] = f"local; parts={','.join(sorted(flags.local))}"
    return response
