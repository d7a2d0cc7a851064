"""The OpenAI Responses wire format as a remote tier speaks it (`responses_api = true` on a
kind="openai" tier: POST {base_url}/responses). Used only for a client that itself spoke
/v1/responses (`GenerationRequest.native`): its body is forwarded as the HTTP edge hands it over,
and the provider's answer and events are decoded into the chat shapes the cascade reads (text,
logprobs, tool calls, finish, usage), each chat chunk keeping the events it came from
(openai_wire.NATIVE_EVENTS) so the Responses endpoint can return them as sent.

Decoding: `message` output items -> content (output_text) and refusal; `function_call` items ->
tool_calls (call_id -> id); `reasoning` items are not chat content (their tokens are in
`completion_tokens_details.reasoning_tokens`); status incomplete -> finish `length`
(max_output_tokens) or `content_filter`; a function call -> `tool_calls`; usage input/output
tokens -> prompt/completion tokens. A `failed` Response or an `error` event is an upstream error.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from localroute.backends.openai_wire import NATIVE_EVENTS, native_chunk

__all__ = ["LOGPROBS_INCLUDE", "ResponsesChunkDecoder", "chat_from_response", "chat_usage", "response_as_client_asked",
           "responses_body"]

LOGPROBS_INCLUDE = "message.output_text.logprobs"


def responses_body(body: Mapping[str, Any], model: str, stream: bool, top_logprobs: int | None = None) -> dict[str, Any]:
    """The client's Responses body for one call to `model`: `stream` set for this call (a buffered
    call of a streamed request is not streamed, and takes no stream_options). `top_logprobs`: a
    non-final tier's buffered call, judged on its logprobs: they are asked for (the include value
    and at least that many alternatives), as a chat tier's call asks for them; the answer is put
    back as the client asked (`response_as_client_asked`)."""
    out = dict(body)
    out["model"] = model
    if stream:
        out["stream"] = True
    else:
        out.pop("stream", None)
        out.pop("stream_options", None)
        if top_logprobs is not None:
            include = list(out.get("include") or [])
            if LOGPROBS_INCLUDE not in include:
                include.append(LOGPROBS_INCLUDE)
            out["include"] = include
            if top_logprobs > int(out.get("top_logprobs") or 0):
                out["top_logprobs"] = top_logprobs
    return out


def response_as_client_asked(response: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """A Response to a call `responses_body` asked logprobs for, as the client's own `body` asked:
    the logprobs of output text taken out when it did not ask for them, the alternatives cut to its
    own top_logprobs when it did, and its own top_logprobs echoed."""
    asked = LOGPROBS_INCLUDE in (body.get("include") or []) or int(body.get("top_logprobs") or 0) > 0
    k = int(body.get("top_logprobs") or 0)

    def part(p: Any) -> Any:
        if not isinstance(p, dict) or p.get("type") != "output_text" or not isinstance(p.get("logprobs"), list):
            return p
        if not asked:
            return {**p, "logprobs": []}
        return {**p, "logprobs": [{**t, "top_logprobs": list(t.get("top_logprobs") or [])[:k]}
                                  if isinstance(t, dict) else t for t in p["logprobs"]]}

    output = [{**item, "content": [part(p) for p in item["content"]]}
              if isinstance(item, dict) and item.get("type") == "message" and isinstance(item.get("content"), list)
              else item for item in response.get("output") or ()]
    out = {**response, "output": output}
    if "top_logprobs" in response:
        out["top_logprobs"] = k
    return out


def chat_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int((usage.get("input_tokens_details") or {})
                                                           .get("cached_tokens") or 0)},
            "completion_tokens_details": {"reasoning_tokens": int((usage.get("output_tokens_details") or {})
                                                                  .get("reasoning_tokens") or 0)}}


def _chat_logprobs(logprobs: Any) -> list[dict[str, Any]]:
    return [{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes"),
             "top_logprobs": list(t.get("top_logprobs") or [])} for t in logprobs or ()]


def _finish(response: Mapping[str, Any], calls: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if calls else "stop"


def _call(item: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"id": item["call_id"], "type": "function",
                            "function": {"name": item["name"], "arguments": item.get("arguments") or ""}}
    return call if index is None else {"index": index, **call}


def chat_from_response(response: Mapping[str, Any]) -> dict[str, Any]:
    """A Response as a chat.completion with one choice (raises TypeError/KeyError when it is not one)."""
    if response.get("object") != "response" or response.get("status") == "failed":
        raise TypeError("not a completed Response")
    text: list[str] = []
    refusal: list[str] = []
    logprobs: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for item in response["output"]:
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    text.append(part["text"])
                    logprobs += _chat_logprobs(part.get("logprobs"))
                elif part.get("type") == "refusal":
                    refusal.append(part["refusal"])
        elif item.get("type") == "function_call":
            calls.append(_call(item))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or (None if calls else "")}
    if refusal:
        message["refusal"] = "".join(refusal)
    if calls:
        message["tool_calls"] = calls
    return {"id": response.get("id", ""), "object": "chat.completion",
            "created": int(response.get("created_at") or time.time()), "model": response.get("model", ""),
            "choices": [{"index": 0, "message": message, "logprobs": {"content": logprobs} if logprobs else None,
                         "finish_reason": _finish(response, bool(calls))}],
            "usage": chat_usage(response.get("usage"))}


def _is_output(kind: str, event: Mapping[str, Any]) -> bool:
    """Whether an event with no chat meaning is the model at work (for the stream's first-token
    deadline): a delta (reasoning, summaries, tool input), an output item done, a hosted tool's
    call added or under way (web_search_call searching, code_interpreter_call interpreting, ...).
    Not output: the lifecycle events and the opening of a message or reasoning item."""
    if kind.endswith(".delta") or kind == "response.output_item.done":
        return True
    if kind == "response.output_item.added":
        return (event.get("item") or {}).get("type") not in ("message", "reasoning")
    parts = kind.split(".")
    return len(parts) == 3 and parts[1].endswith("_call")


class ResponsesChunkDecoder:
    """One stream's Responses events in, chat.completion.chunk dicts out, each carrying its event:
    `response.created` opens the turn, text and refusal deltas are content, a function_call item
    one tool call (its head when added, its arguments as deltas), `response.completed` /
    `response.incomplete` the finish and the usage. Any other event is a chunk of its own."""

    def __init__(self) -> None:
        self._base: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": ""}
        self._calls: dict[str, int] = {}  # function_call item id -> tool call index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                           "logprobs": {"content": logprobs} if logprobs else None}]}

    def __call__(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = str(event.get("type", ""))
        chunk = self._decode(kind, event)
        if chunk is None:
            return native_chunk(event, progress=_is_output(kind, event))
        chunk[NATIVE_EVENTS] = [event]
        return chunk

    def _decode(self, kind: str, event: dict[str, Any]) -> dict[str, Any] | None:
        if kind == "response.created":
            response = event["response"]
            self._base.update(id=response.get("id", ""), model=response.get("model", ""))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "response.output_text.delta":
            return self._chunk({"content": event["delta"]}, logprobs=_chat_logprobs(event.get("logprobs"))) \
                if event["delta"] else None
        if kind == "response.refusal.delta":
            return self._chunk({"refusal": event["delta"]}) if event["delta"] else None
        if kind == "response.output_item.added" and event["item"].get("type") == "function_call":
            item = event["item"]
            index = self._calls[item["id"]] = len(self._calls)
            return self._chunk({"tool_calls": [_call(item, index)]})
        if kind == "response.function_call_arguments.delta" and event.get("item_id") in self._calls:
            if not event["delta"]:
                return None
            return self._chunk({"tool_calls": [{"index": self._calls[event["item_id"]],
                                                "function": {"arguments": event["delta"]}}]})
        if kind in ("response.completed", "response.incomplete"):
            response = event["response"]
            chunk = self._chunk({}, _finish(response, bool(self._calls)))
            chunk["usage"] = chat_usage(response.get("usage"))
            return chunk
        if kind == "response.failed":
            return {"error": (event.get("response") or {}).get("error") or {}}
        if kind == "error":
            return {"error": {k: event.get(k) for k in ("code", "message", "param")}}
        return None
