"""Value objects shared by backends, routers and the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What a request asks of the decoder. temperature 0 means greedy. `seed` is the client's own
    (any int64, as OpenAI allows; forwarded unchanged to a frontier); local samplers use `rng_seed`."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None

    @property
    def rng_seed(self) -> int | None:
        """`seed` as the non-negative integer numpy's generators take: its two's-complement bits as
        an unsigned 64-bit number (-1 -> 2**64 - 1), so distinct int64 seeds stay distinct."""
        return None if self.seed is None else self.seed & 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Either chat `messages` or a raw completion `prompt`."""

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: id, text, logprob and the top-k alternatives (OpenAI shape)."""

    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(slots=True)
class Generation:
    """A finished answer from one tier."""

    text: str
    tokens: list[TokenLogprob]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    latency_s: float = 0.0
    ttft_s: float | None = None
    model: str = ""
    # Usage/cost inputs reported by the engine (frontier: provider usage; local: cpu/energy)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def logprobs(self) -> list[float]:
        return [t.logprob for t in self.tokens]


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """A piece of a streamed answer; the last one carries the finished Generation."""

    text: str
    token: TokenLogprob | None = None
    final: Generation | None = None
