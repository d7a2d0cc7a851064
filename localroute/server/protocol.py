"""OpenAI wire format <-> the internal request and answer: Chat Completions and Completions bodies
to a `GenerationRequest` (the body as sent for remote tiers, its text view for local ones, and what
serving it needs), a routed `Generation` and its `Decision` back to OpenAI JSON (choices, logprobs,
usage with its cost, the `localroute` routing block and the `x-localroute-*` headers)."""

from __future__ import annotations

import json
import math
from typing import Any

from localroute.backends.labels import labels_from_metadata, labels_of
from localroute.errors import InvalidRequestError
from localroute.routing.base import Decision, finite
from localroute.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from localroute.settings import Settings
from localroute.types import Generation, GenerationRequest, SamplingParams, TokenLogprob, WireRequest

__all__ = ["LOCALROUTE_FIELDS", "chat_logprobs", "chat_needs", "chat_request", "completion_logprobs",
           "completion_request", "routing_headers", "routing_info", "usage", "usage_with_cost"]

# request fields that are localroute's own extensions: read here, never forwarded to a remote tier
LOCALROUTE_FIELDS = frozenset({"ignore_eos"})
_PART_NEEDS = {"image_url": "images", "input_audio": "audio", "file": "files"}


def _wire(api: Any, data: dict[str, Any]) -> WireRequest:
    if any(k in data for k in LOCALROUTE_FIELDS):
        data = {k: v for k, v in data.items() if k not in LOCALROUTE_FIELDS}
    return WireRequest(api, data)


def _common_needs(body: ChatCompletionRequest | CompletionRequest, needs: set[str]) -> None:
    if body.n is not None and body.n > 1:
        needs.add("n")
    if body.logit_bias:
        needs.add("logit_bias")
    if body.presence_penalty or body.frequency_penalty:
        needs.add("penalties")


def chat_needs(body: ChatCompletionRequest) -> frozenset[str]:
    """What serving this chat request takes of a tier (localroute.backends.capabilities.NEEDS)."""
    needs: set[str] = set()
    extra = body.model_extra or {}
    if (body.tools and body.tool_choice != "none") or extra.get("functions"):
        needs.add("tools")
    for m in body.messages:
        if m.tool_calls or m.role in ("tool", "function") or (m.model_extra or {}).get("function_call"):
            needs.add("tools")
        if isinstance(m.content, list):
            for part in m.content:
                need = _PART_NEEDS.get(part["type"])
                if need is not None:
                    needs.add(need)
    modalities = extra.get("modalities")
    if extra.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        needs.add("audio")
    if isinstance(body.response_format, dict) and body.response_format.get("type") == "json_schema":
        needs.add("json_schema")
    if body.logprobs:
        needs.add("logprobs")
    _common_needs(body, needs)
    return frozenset(needs)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"<token id>": bias}` as sorted (id, bias) pairs; a key that is not a token id is a 400."""
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit():
            raise InvalidRequestError(f"logit_bias: key {key[:32]!r} is not a token id", param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def _sampling(body: ChatCompletionRequest | CompletionRequest, settings: Settings, top_logprobs: int) -> SamplingParams:
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
        logit_bias=_logit_bias(body.logit_bias),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        n=body.n or 1,
    )


def chat_request(body: ChatCompletionRequest, data: dict[str, Any], settings: Settings,
                 request_id: str, labels: tuple[str, ...] | None = None) -> GenerationRequest:
    """`data`: the body as parsed JSON, `body` its validated form. Local tiers see the text of
    each message; a request with more than text (tools, images) needs a tier that reads it.
    `labels`: the choice task's, when `data` no longer has them (strip_category took
    metadata.labels out before the frontier sees the body); None: read from data's metadata."""
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    messages = tuple({"role": "system" if m.role == "developer" else m.role, "content": _local_text(m)}
                     for m in body.messages)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    params = _sampling(body, settings, top)
    if labels is None:
        labels = labels_from_metadata(data.get("metadata"))
    labels_of(labels, params.response_format)  # too many or too long (an enum's too): 400 here, not on the engine
    return GenerationRequest(messages=messages, params=params, request_id=request_id,
                             wire=_wire("chat", data), needs=chat_needs(body), tools=_called_tools(body),
                             labels=labels, parallel_tool_calls=_parallel_calls(body))


def _local_text(m: ChatMessage) -> str:
    """A message as a local template renders it: its text, and an assistant's tool calls in the
    JSON form a local tier answers them in (backends/tool_calls.py)."""
    text = m.text()
    for call in m.tool_calls or ():
        if call.function is not None:
            try:
                arguments: Any = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            text += json.dumps({"name": call.function.name, "arguments": arguments})
    return text


def _called_tools(body: ChatCompletionRequest) -> tuple[dict[str, Any], ...]:
    """The function definitions a local answer may call, after tool_choice."""
    if not body.tools or body.tool_choice == "none":
        return ()
    fns = [t.function.model_dump(exclude_none=True) for t in body.tools if t.type == "function" and t.function]
    if isinstance(body.tool_choice, dict):
        name = (body.tool_choice.get("function") or {}).get("name")
        fns = [f for f in fns if f["name"] == name]
    return tuple(fns)


def _parallel_calls(body: ChatCompletionRequest) -> bool | None:
    """The client's parallel_tool_calls, None when omitted (a local answer is then one call, see
    backends/tool_calls.py); False when it names the function (one call of it)."""
    return False if isinstance(body.tool_choice, dict) else body.parallel_tool_calls


def completion_request(body: CompletionRequest, data: dict[str, Any], settings: Settings,
                       request_id: str) -> GenerationRequest:
    needs: set[str] = {"logprobs"} if body.logprobs is not None else set()
    _common_needs(body, needs)
    return GenerationRequest(
        prompt=body.prompt_text(), params=_sampling(body, settings, body.logprobs or 0), request_id=request_id,
        wire=_wire("completions", data), needs=frozenset(needs),
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


def usage_with_cost(base: dict[str, Any], cost_usd: float | None) -> dict[str, Any]:
    """A usage block with localroute's cost as `usage.cost` (USD): the field OpenAI-compatible
    routers report their charge in, which litellm takes as the call's cost (its
    `provider_reported_usage_cost`, read into `_hidden_params["response_cost"]`) and LangChain shows
    in `response_metadata["token_usage"]`. A provider's own `cost` is replaced (it is kept in
    the `localroute` block as `upstream_cost`): ours covers every attempt of the request."""
    out = dict(base)
    if cost_usd is not None:
        out["cost"] = cost_usd
    return out
