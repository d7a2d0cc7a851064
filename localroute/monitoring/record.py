"""The per-request event every observer consumes (routing log, metrics, feedback sampler).

It lives below the HTTP edge and the observers so that neither imports the other: the server
builds a RequestRecord when a request ends and hands it to `Service.record`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localroute.routing.base import Decision
    from localroute.types import Generation

__all__ = ["Observer", "RequestRecord"]


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; handed to every observer (routing log, metrics, ...)."""

    request_id: str
    endpoint: str
    policy: str
    stream: bool
    status_code: int
    started_at: float
    latency_s: float
    ttft_s: float | None = None
    decision: Decision | None = None
    generation: Generation | None = None
    error: str | None = None
    disconnected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[RequestRecord], None]

