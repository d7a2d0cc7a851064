"""Connection limits uvicorn lacks, for `localroute serve`: a deadline for a request's headers and a
cap on open connections.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and, past `limit_concurrency`,
answers 503 once a request's headers are in; but a connection that never completes its headers (one
that sends nothing, or half a header block, slowloris-style) is held for ever, one file descriptor
each. `guarded_protocol` returns uvicorn's own protocol class (httptools, or h11 without it) with:

- a header deadline: from accept, and from the first byte after a finished response, the headers
  must be complete within `http_header_timeout_s`, else the connection is closed (there is no
  request yet to answer);
- a connection cap: a connection beyond `max_connections` gets an OpenAI-shaped 503 and is closed at
  once, before it can hold anything.

The body's deadline (`http_body_timeout_s`, a 408) is the app's (server/http.py BodyLimitMiddleware):
the headers are in by then, so the client can be given an answer it can read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from localroute.server.errors import error_body

if TYPE_CHECKING:
    import uvicorn

    from localroute.settings import Settings

log = logging.getLogger(__name__)

HttpImpl = Literal["auto", "httptools", "h11"]


def _over_capacity_response(max_connections: int) -> bytes:
    body = json.dumps(error_body(
        f"too many open connections (max_connections={max_connections}); retry shortly",
        "service_unavailable", None, "too_many_connections")).encode()
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n" % len(body))
    return head + body


class _ConnectionGuard(asyncio.Protocol):
    """Mixin over a uvicorn HTTP protocol class (both keep the request in flight as `self.cycle`: a
    new cycle object means a request's headers are complete)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    over_capacity: bytes = b""
    refused_total = 0  # connections closed over the cap, all protocols of this class
    _refusal_logged_at = 0.0

    # set by uvicorn's protocol classes
    cycle: Any
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    _header_timer: asyncio.TimerHandle | None = None
    _seen_cycle: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request: its headers are due
        super().data_received(data)
        if self.cycle is not self._seen_cycle:  # they are complete
            self._seen_cycle = self.cycle
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _refuse(self) -> None:
        cls = type(self)
        cls.refused_total += 1
        now = time.monotonic()
        if now - cls._refusal_logged_at >= 10.0:  # a flood of refusals is one line per 10 s
            cls._refusal_logged_at = now
            log.warning("over max_connections=%d: refusing connections (%d so far)", self.max_connections,
                        cls.refused_total)
        self.transport.write(self.over_capacity)
        self.transport.close()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.cycle is not self._seen_cycle:  # completed outside data_received (h11, pipelined)
            self._seen_cycle = self.cycle
            return
        if not self.transport.is_closing():
            self.transport.close()


def _base_protocol(http: HttpImpl) -> type[asyncio.Protocol]:
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
        else:
            return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def guarded_protocol(settings: Settings, http: HttpImpl = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`http`: as uvicorn's `--http`) with the header deadline and
    the connection cap of `settings`."""
    base = _base_protocol(http)
    attrs = {"header_timeout_s": settings.http_header_timeout_s, "max_connections": settings.max_connections,
             "over_capacity": _over_capacity_response(settings.max_connections)}
    return type(f"Guarded{base.__name__}", (_ConnectionGuard, base), attrs)


def ensure_fd_limit(max_connections: int, spare: int = 256) -> None:
    """Raise the soft open-file limit (up to the hard one) so `max_connections` sockets fit beside
    the models, logs and databases; warn when the hard limit does not allow it."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            log.warning("open-file limit %d is below max_connections=%d + %d spare; lower max_connections",
                        target, max_connections, spare)


def server_config(app: Any, settings: Settings, *, port: int | None = None, log_level: str | None = None,
                  http: HttpImpl = "auto") -> uvicorn.Config:
    """The uvicorn configuration `localroute serve` runs (tests start servers with it too)."""
    import uvicorn

    return uvicorn.Config(
        app, host=settings.host, port=settings.port if port is None else port,
        log_level=log_level or settings.log_level, access_log=False, http=guarded_protocol(settings, http),
    )
