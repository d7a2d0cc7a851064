"""A scripted backend for unit tests of routing logic (never the only test of a real backend)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from localroute.errors import LocalrouteError
from localroute.routing.cascade import replay
from localroute.types import Generation, GenerationRequest, StreamDelta, TokenLogprob, TopLogprob


def tokens(logprobs: Sequence[float], text: str = "ok") -> list[TokenLogprob]:
    """Tokens whose text concatenates to `text` (split evenly) with the given logprobs."""
    n = len(logprobs)
    step = max(1, len(text) // max(n, 1))
    pieces = [text[i * step : (i + 1) * step] for i in range(n - 1)] + [text[(n - 1) * step :]] if n else []
    return [
        TokenLogprob(i, p, lp, tuple(p.encode()), (TopLogprob(p, lp), TopLogprob("x", lp - 1.0)))
        for i, (p, lp) in enumerate(zip(pieces, logprobs))
    ]


class ScriptedBackend:
    """Answers every request with the same text and logprobs, or raises `error`."""

    def __init__(self, name: str, text: str, logprobs: Sequence[float], *, local: bool = True,
                 error: LocalrouteError | None = None) -> None:
        self.name = name
        self.is_local = local
        self.text = text
        self.logprobs = list(logprobs)
        self.error = error
        self.calls = 0

    def _gen(self, request: GenerationRequest) -> Generation:
        toks = tokens(self.logprobs, self.text)
        return Generation(self.text, toks, "stop", 5, len(toks), 0.01, 0.005, self.name)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self._gen(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        gen = self._gen(request)
        for delta in replay(gen):
            yield delta
        yield StreamDelta(text="", final=gen)

    def health(self) -> dict[str, Any]:
        return {"ok": self.error is None}

    async def aclose(self) -> None:
        return None
