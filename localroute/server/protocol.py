"""OpenAI wire format <-> the internal request and answer: Chat Completions and Completions bodies
to a `GenerationRequest`, a routed `Generation` and its `Decision` back to OpenAI JSON (choices,
logprobs, usage, the `localroute` routing block and the `x-localroute-*` headers)."""

from __future__ import annotations

import math
from typing import Any

from localroute.errors import InvalidRequestError
from localroute.routing.base import Decision, finite
from localroute.server.schemas import ChatCompletionRequest, CompletionRequest
from localroute.settings import Settings
from localroute.types import Generation, GenerationRequest, SamplingParams, TokenLogprob

__all__ = ["chat_logprobs", "chat_request", "completion_logprobs", "completion_request", "routing_headers",
           "routing_info", "usage"]


def _sampling(body: ChatCompletionRequest | CompletionRequest, settings: Settings, top_logprobs: int) -> SamplingParams:
    if body.n not in (None, 1):
        raise InvalidRequestError("n > 1 is not supported; send one request per answer", param="n")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or settings.default_max_tokens
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stops(),
        top_logprobs=top_logprobs,
        response_format=getattr(body, "response_format", None),
        ignore_eos=body.ignore_eos,
    )


def chat_request(body: ChatCompletionRequest, settings: Settings, request_id: str) -> GenerationRequest:
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    messages = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise InvalidRequestError(f"messages.{i}.content: {exc}", param=f"messages.{i}.content") from None
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": text})
    top = (body.top_logprobs or 0) if body.logprobs else 0
    return GenerationRequest(
        messages=tuple(messages), params=_sampling(body, settings, top), request_id=request_id
    )


def completion_request(body: CompletionRequest, settings: Settings, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        prompt=body.prompt_text(), params=_sampling(body, settings, body.logprobs or 0), request_id=request_id
    )


def routing_info(decision: Decision, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `localroute` block of an answer: the decision and, when priced, its cost."""
    info = decision.as_dict()
    if cost:
        info.update(cost)
    return info


def routing_headers(decision: Decision, final: bool = True) -> dict[str, str]:
    headers = {
        "x-localroute-tier": decision.answered_by,
        "x-localroute-escalated": "true" if decision.escalated or not final and _pending_escalation(decision) else "false",
        "x-localroute-policy": decision.policy,
    }
    conf = decision.confidence if final else None
    if conf is not None and not math.isnan(conf):
        headers["x-localroute-confidence"] = f"{finite(conf):.6f}"
    if decision.degraded:
        headers["x-localroute-degraded"] = decision.degraded
    return headers


def _pending_escalation(decision: Decision) -> bool:
    return any(a.tier != decision.answered_by for a in decision.attempts)


def chat_logprobs(tokens: list[TokenLogprob], k: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes) if t.bytes is not None else None,
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes) if a.bytes is not None else None}
                    for a in t.top_logprobs[:k]
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[TokenLogprob], k: int, offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs[:k]} for t in tokens],
        "text_offset": offsets,
    }


def usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }
