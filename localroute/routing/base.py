"""The router contract and the evidence every routing decision carries."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from localroute.backends.base import Backend
from localroute.backends.capabilities import Capabilities
from localroute.types import Generation, GenerationRequest, StreamDelta


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A tier's pooled threshold and its per-category ones (issue 19), one immutable version: a new
    calibration replaces the whole object in one assignment, so a request never mixes two."""

    pooled: float | None = None
    categories: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, category: str | None) -> float | None:
        """The threshold an answer to a request of this category must reach (None: always accepted)."""
        if self.pooled is None:
            return None
        return self.categories.get(category, self.pooled) if category is not None else self.pooled


class Tier:
    """A backend on the ladder with the threshold its confidence must reach to answer, and what it
    can serve: given, else the backend's own `capabilities`, else its kind's defaults."""

    __slots__ = ("backend", "capabilities", "name", "thresholds")

    def __init__(self, name: str, backend: Backend, threshold: float | None = None,
                 capabilities: Capabilities | None = None,
                 category_thresholds: Mapping[str, float] | None = None) -> None:
        self.name = name
        self.backend = backend
        self.capabilities = capabilities if capabilities is not None else backend.capabilities
        # thresholds calibrated per task category (issue 19); a category not here uses `threshold`
        self.thresholds = Thresholds(threshold, MappingProxyType(dict(category_thresholds or {})))

    def __repr__(self) -> str:
        return f"Tier({self.name!r}, threshold={self.threshold!r}, categories={dict(self.category_thresholds)!r})"

    @property
    def threshold(self) -> float | None:
        return self.thresholds.pooled

    @property
    def category_thresholds(self) -> Mapping[str, float]:
        return self.thresholds.categories

    def set_thresholds(self, threshold: float | None, categories: Mapping[str, float]) -> None:
        """Swap in a new version: a single attribute assignment, atomic for every reader."""
        self.thresholds = Thresholds(threshold, MappingProxyType(dict(categories)))

    def threshold_for(self, category: str | None) -> float | None:
        """The threshold an answer to a request of this category must reach (None: always accepted).
        A router reads it once per attempt and passes the value on."""
        return self.thresholds.of(category)

    def lacks(self, needs: frozenset[str]) -> str | None:
        """The first of `needs` this tier cannot serve (localroute.backends.capabilities.NEEDS), or None."""
        return self.capabilities.missing(needs) if needs and self.capabilities is not None else None


def finite(x: float | None) -> float | None:
    """NaN -> None; +-inf clamped to +-1e9 (JSON and SQLite aggregates cannot hold them)."""
    if x is None or math.isnan(x):
        return None
    return max(min(x, 1e9), -1e9)


@dataclass(slots=True)
class TierAttempt:
    tier: str
    confidence: float | None
    threshold: float | None
    accepted: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "confidence": finite(self.confidence), "threshold": self.threshold,
                "accepted": self.accepted, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_s": round(self.latency_s, 6),
                "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6), "error": self.error}


@dataclass(slots=True)
class Decision:
    """What the router did: tiers tried in order, who answered, on what signal."""

    policy: str
    signal: str
    attempts: list[TierAttempt] = field(default_factory=list)
    answered_by: str = ""
    degraded: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def escalated(self) -> bool:
        return len(self.attempts) > 1

    @property
    def confidence(self) -> float | None:
        for a in self.attempts:
            if a.tier == self.answered_by:
                return a.confidence
        return None

    def as_dict(self) -> dict[str, Any]:
        """The one JSON form of a decision: the API's `localroute` block, `localroute ask`, the
        routing log's attempts column. Numbers are JSON-safe (`finite`)."""
        out: dict[str, Any] = {
            "policy": self.policy,
            "tier": self.answered_by,
            "confidence": finite(self.confidence),
            "escalated": self.escalated,
            "signal": self.signal,
            "degraded": self.degraded,
            "attempts": [a.as_dict() for a in self.attempts],
        }
        if self.evidence:  # pre-inference router scores, verifier P(Yes), schema violations
            out["evidence"] = self.evidence
        return out


@dataclass(slots=True)
class Routed:
    generation: Generation
    decision: Decision


@dataclass(frozen=True, slots=True)
class RoutedDelta:
    """A streamed piece. `decision` is live: its answered_by is set before the first piece is
    yielded, so a server can put it in headers; the last piece carries the finished Routed."""

    delta: StreamDelta
    decision: Decision
    routed: Routed | None = None


class Router(Protocol):
    """A routing policy, selectable by model id (e.g. `localroute/cascade`)."""

    policy: str

    async def route(self, request: GenerationRequest) -> Routed:
        ...

    def route_stream(self, request: GenerationRequest) -> AsyncIterator[RoutedDelta]:
        ...
