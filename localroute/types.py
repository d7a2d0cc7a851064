"""Value objects shared by backends, routers and the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# "tool_calls", "content_filter" and "function_call" come from remote tiers and pass through as sent
FinishReason = Literal["stop", "length", "error", "cancelled", "tool_calls", "content_filter", "function_call"]
WireApi = Literal["chat", "completions", "messages", "responses"]


@dataclass(frozen=True, slots=True)
class WireRequest:
    """The client's request body as sent (parsed JSON, every field, unknown ones included), for a
    tier that speaks the same API: a remote OpenAI-compatible tier forwards it with only `model`
    replaced and localroute's own fields removed. `headers`: the client's API headers such a tier
    gets as sent (Messages: `anthropic-version`, `anthropic-beta`), name and value, in order. Never mutated."""

    api: WireApi
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What a request asks of the decoder. temperature 0 means greedy. `seed` is the client's own
    (any int64, as OpenAI allows; forwarded unchanged to a frontier); local samplers use `rng_seed`.
    `logit_bias`: (token id, bias) pairs added to the logits; the penalties are OpenAI's, over the
    tokens generated so far (backends/decoding.py: `LogitsAdjuster`)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1  # choices to generate (a local engine decodes them as parallel sequences)

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler must change the logits row before choosing (bias or penalties)."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def rng_seed(self) -> int | None:
        """`seed` as the non-negative integer numpy's generators take: its two's-complement bits as
        an unsigned 64-bit number (-1 -> 2**64 - 1), so distinct int64 seeds stay distinct."""
        return None if self.seed is None else self.seed & 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class EscalationBound:
    """A non-final tier's acceptance test, handed to its engine so the decode can stop as soon as
    the answer can no longer reach `threshold` on `aggregator` (backends/decoding.py `EarlyExit`):
    an answer stopped this way would have been escalated anyway."""

    aggregator: str
    threshold: float
    alpha: float = 0.1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Either chat `messages` or a raw completion `prompt`: the text view a local engine renders.
    `wire` is the body as the client sent it (remote tiers forward it); `needs` the capabilities
    serving it takes (localroute.capabilities: "tools", "images", "n", ...), computed at the edge."""

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    wire: WireRequest | None = None
    # the client's body in the API it spoke when that is not chat (a Messages request routed
    # through the chat path): a tier speaking that API natively forwards this one unchanged
    native: WireRequest | None = None
    needs: frozenset[str] = frozenset()
    # OpenAI function definitions (name, description, parameters) the answer must call, after
    # tool_choice ("none": empty; a named function: that one); a local tier with tools answers a call
    tools: tuple[dict[str, Any], ...] = ()
    # the request's task category (issue 19: routing/categories.py): picks the tier thresholds
    # calibrated for it, labels it in the log, metrics and reports
    category: str = "default"
    # the allowed answers of a choice task (a json_schema enum, eval choices, metadata.labels): a
    # local engine scores each at the chosen label's position (backends/labels.py, Generation.extra["label"])
    labels: tuple[str, ...] = ()
    # whether the engine scores those labels: the cascade turns it off when its signal is not
    # label_confidence (the scores would cost engine time and decide nothing)
    score_labels: bool = True
    # set by the cascade for a non-final local tier: stop decoding once acceptance is impossible
    escalate_below: EscalationBound | None = None
    # with `tools`: the client's parallel_tool_calls as sent (None: omitted; False for a named
    # tool_choice). A local tier answers with several calls only when it is True (tool_calls.py)
    parallel_tool_calls: bool | None = None
    # when the tier was handed this request (time.perf_counter: CLOCK_MONOTONIC, the same clock in
    # every process): an engine process's parent sets it just before its pipe write, so that the
    # engine's time starts at the same hand-off as in-process, where the loop's waking of the engine
    # thread is engine time too (server/timing.py); None: the engine starts the clock itself
    handed_at: float | None = None


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
    # A remote tier's answer as the provider sent it (chat.completion JSON), passed through to the
    # client with only localroute's id, model and routing block set; None for local tiers.
    raw: dict[str, Any] | None = None
    # an n > 1 answer: the other choices (index 1..n-1), this one being index 0. The prompt is counted
    # once (prompt_tokens here); completion_tokens here is the sum over every choice
    choices: list[Generation] = field(default_factory=list)

    @property
    def logprobs(self) -> list[float]:
        return [t.logprob for t in self.tokens]


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """A piece of a streamed answer; the last one carries the finished Generation. `raw`: a remote
    tier's stream chunk as the provider sent it (tool-call, refusal, audio deltas...), passed through.
    `finish_reason`: n > 1, choice `index` has finished (no text): its finish chunk goes out now, as
    OpenAI's does, not with the final delta (which still carries every choice, this one included)."""

    text: str
    token: TokenLogprob | None = None
    final: Generation | None = None
    raw: dict[str, Any] | None = None
    index: int = 0  # the choice this text belongs to (n > 1)
    finish_reason: FinishReason | None = None
