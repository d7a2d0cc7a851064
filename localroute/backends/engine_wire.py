"""The pipe's format between a supervised tier and its engine process: imported by both sides
(the parent's, backends/supervised.py; the child's, backends/engine_child.py), each encoder next to
its decoder. Errors cross as plain data and are rebuilt as their own LocalrouteError class."""

from __future__ import annotations

from typing import Any

from localroute import errors
from localroute.errors import BackendUnavailableError, LocalrouteError
from localroute.types import FinishReason, Generation, TokenLogprob, TopLogprob

Event = tuple[Any, ...]
ErrorSpec = tuple[str, str, str | None, str | None, float | None]
# The per-token path's wire format: tokens and answers as tuples of primitives. A pickled dataclass
# costs a class lookup and a state dict on each side, per token and per top logprob; a 64-token
# answer with 5 top logprobs took ~5 ms to pickle and unpickle, as tuples ~1 ms with the rebuild.
TopWire = tuple[str, float, tuple[int, ...] | None]
TokenWire = tuple[int, str, float, tuple[int, ...] | None, tuple[TopWire, ...]]
# the last item: an n > 1 answer's other choices, as GenerationWire themselves
GenerationWire = tuple[str, list[TokenWire], FinishReason, int, int, float, float | None, str, dict[str, Any],
                       dict[str, Any] | None, list[Any]]


def _token_wire(tok: TokenLogprob) -> TokenWire:
    return (tok.token_id, tok.token, tok.logprob, tok.bytes,
            tuple([(t.token, t.logprob, t.bytes) for t in tok.top_logprobs]))


def _token(wire: TokenWire) -> TokenLogprob:
    token_id, text, logprob, raw, tops = wire
    return TokenLogprob(token_id, text, logprob, raw, tuple([TopLogprob(t, lp, b) for t, lp, b in tops]))


def _generation_wire(gen: Generation) -> GenerationWire:
    return (gen.text, [_token_wire(t) for t in gen.tokens], gen.finish_reason, gen.prompt_tokens,
            gen.completion_tokens, gen.latency_s, gen.ttft_s, gen.model, gen.extra, gen.raw,
            [_generation_wire(c) for c in gen.choices])


def _generation(wire: GenerationWire) -> Generation:
    text, tokens, reason, prompt_tokens, completion_tokens, latency_s, ttft_s, model, extra, raw, choices = wire
    return Generation(text, [_token(t) for t in tokens], reason, prompt_tokens, completion_tokens, latency_s,
                      ttft_s, model, extra, raw,  # raw: a local tool call's chat.completion
                      [_generation(c) for c in choices])


def _spec(exc: BaseException) -> ErrorSpec:
    """An exception as plain data: LocalrouteError subclasses are rebuilt by name in the parent."""
    if isinstance(exc, LocalrouteError):
        return type(exc).__name__, exc.message, exc.param, exc.code, exc.retry_after_s
    return "BackendUnavailableError", f"local engine error: {type(exc).__name__}: {exc}", None, None, 1.0


def _rebuild(spec: ErrorSpec) -> LocalrouteError:
    name, message, param, code, retry_after_s = spec
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, LocalrouteError)):
        cls = BackendUnavailableError
    exc = cls(message, param=param, retry_after_s=retry_after_s)
    if code is not None:
        exc.code = code
    return exc
