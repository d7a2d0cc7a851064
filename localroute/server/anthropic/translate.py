"""Anthropic Messages <-> OpenAI Chat Completions, as pure functions over JSON dicts.

Requests go Messages -> chat (`to_chat`, and back with `from_chat`, which the round-trip tests
use); answers chat -> Messages (`message_from_chat`), streams as `MessagesStream`, which turns chat
chunks into the Messages event sequence. Field pairs:

- `system` -> a leading system message; `max_tokens` -> `max_completion_tokens`;
  `stop_sequences` -> `stop`; `metadata.user_id` -> `user`; `temperature`, `top_p` as they are;
  `top_k` -> `top_k` (the chat extension vLLM and llama.cpp take); `service_tier` auto -> auto,
  standard_only -> default; `output_config.format` -> `response_format` json_schema.
- `tools[].input_schema` -> `tools[].function.parameters`; `tool_choice` auto/any/tool/none ->
  auto/required/{function}/none; `disable_parallel_tool_use` -> `parallel_tool_calls` (negated).
- Blocks: text -> text part; image (base64 or url) -> `image_url` (a data: URL for base64);
  assistant `tool_use` -> `tool_calls` (input object -> arguments JSON string); user
  `tool_result` -> a `tool` message before the rest of that user turn.
- `cache_control` on a block or tool, and `is_error` on a tool result, have no chat field: they
  are carried as same-named extension keys on the chat part, tool or tool message (a chat tier that
  forwards the body unchanged hands them on; a local tier reads only what it understands).

Messages-only features: thinking other than disabled (and thinking / redacted_thinking blocks of
earlier turns), citations, and a final assistant message (prefill: chat has no "continue this
turn"). Given a `needs` set (the endpoint does), they are recorded there as capability needs, so
the request can go only to a tier speaking Messages, which gets the body as sent; without one, a 400
naming the field. Refused with a 400 naming the field: text after a tool_use in one assistant
turn, images in tool results or assistant turns, and the account-level fields (container, speed, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from localroute.backends.anthropic_http import blocks_from_parts, tool_choice_from_chat, tool_from_chat
from localroute.backends.openai_wire import NATIVE_ANSWER, NATIVE_EVENTS
from localroute.server.translate import arguments_object, refuse_set, untranslatable

__all__ = ["MessagesStream", "from_chat", "message_events", "message_from_chat", "stop_reason", "to_chat",
           "usage_from_chat"]

_ACCOUNT_FIELDS: dict[str, tuple[Any, ...]] = {
    "cache_control": (), "speed": ("standard",), "user_profile_id": (), "workspace_id": (), "container": (),
    "diagnostics": (), "inference_geo": (),
}
_TIER_TO_CHAT = {"auto": "auto", "standard_only": "default"}
_TIER_FROM_CHAT = {v: k for k, v in _TIER_TO_CHAT.items()}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
         "content_filter": "refusal"}


# ---- requests: Messages -> chat ----


def to_chat(body: Mapping[str, Any], needs: set[str] | None = None) -> dict[str, Any]:
    """A validated Messages (or count_tokens) body as a Chat Completions body. `needs`: where the
    Messages-only features the body asks for are recorded ("thinking", "citations", "prefill":
    backends/capabilities.py) when a tier speaking Messages may serve it from the body as sent;
    the chat body then leaves them out (no chat tier reads them: capability routing skips those).
    Without it they are refused (400) like any untranslatable field."""
    refuse_set(body, "", _ACCOUNT_FIELDS)
    ctx = _Context(needs)
    thinking = body.get("thinking")
    if thinking is not None and thinking.get("type") != "disabled":
        ctx.need("thinking", "thinking", "chat tiers take no thinking budget")
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _text_content(body["system"], "system", ctx)})
    for i, m in enumerate(body["messages"]):
        messages.extend(_message(m, f"messages.{i}", ctx))
    if body["messages"] and body["messages"][-1]["role"] == "assistant":
        ctx.need("prefill", f"messages.{len(body['messages']) - 1}",
                 "a final assistant message is a prefill; chat has no way to continue a turn")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if "max_tokens" in body:
        chat["max_completion_tokens"] = body["max_tokens"]
    if body.get("stop_sequences") is not None:
        chat["stop"] = list(body["stop_sequences"])
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    metadata = body.get("metadata")
    if metadata and metadata.get("user_id") is not None:
        chat["user"] = metadata["user_id"]
    if body.get("stream") is not None:
        chat["stream"] = body["stream"]
        if body["stream"]:
            chat["stream_options"] = {"include_usage": True}  # usage for message_delta
    if body.get("service_tier") is not None:
        chat["service_tier"] = _TIER_TO_CHAT[body["service_tier"]]
    if body.get("tools") is not None:
        chat["tools"] = [_tool(t, f"tools.{i}") for i, t in enumerate(body["tools"])]
    if body.get("tool_choice") is not None:
        chat.update(_tool_choice(body["tool_choice"]))
    output_config = body.get("output_config")
    if output_config is not None:
        refuse_set(output_config, "output_config.", {"effort": ()})
        if output_config.get("format") is not None:
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": output_config["format"]["schema"], "strict": True}}
    return chat


class _Context:
    """Where to_chat records the Messages-only needs (None: refuse them)."""

    def __init__(self, needs: set[str] | None) -> None:
        self.needs = needs

    def need(self, need: str, param: str, why: str = "") -> None:
        if self.needs is None:
            untranslatable(param, why)
        self.needs.add(need)


def _text_part(block: Mapping[str, Any], where: str, ctx: _Context) -> dict[str, Any]:
    if block.get("citations"):
        ctx.need("citations", f"{where}.citations", "chat has no citations")
    part: dict[str, Any] = {"type": "text", "text": block["text"]}
    if block.get("cache_control") is not None:
        part["cache_control"] = block["cache_control"]
    return part


def _text_content(content: str | list[Mapping[str, Any]], where: str, ctx: _Context) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if block["type"] != "text":
            untranslatable(f"{where}.{j}", f"only text blocks can go here, not {block['type']}")
        parts.append(_text_part(block, f"{where}.{j}", ctx))
    return parts


def _image_part(block: Mapping[str, Any]) -> dict[str, Any]:
    source = block["source"]
    url = f"data:{source['media_type']};base64,{source['data']}" if source["type"] == "base64" else source["url"]
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    if block.get("cache_control") is not None:
        part["cache_control"] = block["cache_control"]
    return part


def _message(m: Mapping[str, Any], where: str, ctx: _Context) -> list[dict[str, Any]]:
    role, content = m["role"], m["content"]
    if role == "system":
        return [{"role": "system", "content": _text_content(content, f"{where}.content", ctx)}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if role == "user":
        return _user(content, f"{where}.content", ctx)
    return [_assistant(content, f"{where}.content", ctx)]


def _user(blocks: list[Mapping[str, Any]], where: str, ctx: _Context) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block["type"]
        if kind == "tool_result":
            if parts:
                untranslatable(f"{where}.{j}", "tool_result blocks must come before the turn's other blocks")
            tools.append(_tool_result(block, f"{where}.{j}", ctx))
        elif kind == "text":
            parts.append(_text_part(block, f"{where}.{j}", ctx))
        elif kind == "image":
            parts.append(_image_part(block))
        else:
            untranslatable(f"{where}.{j}", f"a user turn cannot carry a {kind} block")
    out = tools
    if parts or not tools:
        out.append({"role": "user", "content": parts})
    return out


def _tool_result(block: Mapping[str, Any], where: str, ctx: _Context) -> dict[str, Any]:
    refuse_set(block, f"{where}.", {"toolset_name": ()})
    content = block.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = _text_content(content, f"{where}.content", ctx)
    msg: dict[str, Any] = {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}
    for extension in ("is_error", "cache_control"):
        if block.get(extension) is not None:
            msg[extension] = block[extension]
    return msg


def _assistant(blocks: list[Mapping[str, Any]], where: str, ctx: _Context) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block["type"]
        if kind in ("thinking", "redacted_thinking"):  # an earlier turn's thinking, sent back with it
            ctx.need("thinking", f"{where}.{j}", "chat has no thinking blocks")
        elif kind == "text":
            if calls:
                untranslatable(f"{where}.{j}", "text after a tool_use in the same turn")
            parts.append(_text_part(block, f"{where}.{j}", ctx))
        elif kind == "tool_use":
            refuse_set(block, f"{where}.{j}.", {"cache_control": (), "toolset_name": ()})
            caller = block.get("caller")
            if caller is not None and caller != {"type": "direct"}:
                untranslatable(f"{where}.{j}.caller", "server-side tool callers")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False, separators=(",", ":"))}})
        else:
            untranslatable(f"{where}.{j}", f"an assistant turn cannot carry a {kind} block")
    msg: dict[str, Any] = {"role": "assistant", "content": parts or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tool(tool: Mapping[str, Any], where: str) -> dict[str, Any]:
    refuse_set(tool, f"{where}.", {"defer_loading": (False,), "eager_input_streaming": (False,),
                                   "input_examples": (), "allowed_callers": ()})
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = tool["input_schema"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    out: dict[str, Any] = {"type": "function", "function": function}
    if tool.get("cache_control") is not None:
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice: Mapping[str, Any]) -> dict[str, Any]:
    kind = choice["type"]
    out: dict[str, Any] = {"tool_choice": {
        "auto": "auto", "any": "required", "none": "none",
    }.get(kind) or {"type": "function", "function": {"name": choice.get("name")}}}
    if choice.get("disable_parallel_tool_use") is not None:
        out["parallel_tool_calls"] = not choice["disable_parallel_tool_use"]
    return out


# ---- requests: chat -> Messages (the inverse, for round trips) ----


def from_chat(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The Messages body that `to_chat` maps onto `chat`: `from_chat(to_chat(b)) == b`."""
    body: dict[str, Any] = {"model": chat["model"]}
    if "max_completion_tokens" in chat:
        body["max_tokens"] = chat["max_completion_tokens"]
    messages = list(chat["messages"])
    if messages and messages[0]["role"] == "system":
        body["system"] = blocks_from_parts(messages.pop(0)["content"])
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m["tool_call_id"],
                                     "content": blocks_from_parts(m["content"])}
            block.update({k: m[k] for k in ("is_error", "cache_control") if k in m})
            if out and out[-1]["role"] == "user" and out[-1].get("_open"):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block], "_open": True})
        elif m["role"] == "user" and out and out[-1].get("_open"):
            out[-1]["content"].extend(blocks_from_parts(m["content"]))
            del out[-1]["_open"]
        elif m["role"] == "assistant" and (m.get("tool_calls") or not isinstance(m.get("content"), str)):
            blocks = blocks_from_parts(m.get("content") or [])
            assert isinstance(blocks, list)
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"])} for c in m.get("tool_calls") or ()]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": m["role"], "content": blocks_from_parts(m["content"])})
    for m in out:
        m.pop("_open", None)
    body["messages"] = out
    if "stop" in chat:
        body["stop_sequences"] = chat["stop"]
    for name in ("temperature", "top_p", "top_k"):
        if name in chat:
            body[name] = chat[name]
    if "user" in chat:
        body["metadata"] = {"user_id": chat["user"]}
    if "stream" in chat:
        body["stream"] = chat["stream"]
    if "service_tier" in chat:
        body["service_tier"] = _TIER_FROM_CHAT[chat["service_tier"]]
    if "tools" in chat:
        body["tools"] = [tool_from_chat(t) for t in chat["tools"]]
    if "tool_choice" in chat:
        body["tool_choice"] = tool_choice_from_chat(chat["tool_choice"], chat.get("parallel_tool_calls"))
    if "response_format" in chat:
        body["output_config"] = {"format": {"type": "json_schema",
                                            "schema": chat["response_format"]["json_schema"]["schema"]}}
    return body


# ---- answers: chat -> Messages ----


def message_id(chat_id: str) -> str:
    return "msg_" + chat_id.split("-", 1)[-1]


def stop_reason(finish_reason: str | None) -> str:
    return _STOP.get(finish_reason or "stop", "end_turn")


def usage_from_chat(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """Anthropic's input_tokens exclude cached ones; chat's prompt_tokens include them."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0)
    written = int(details.get("cache_write_tokens") or 0)
    return {"input_tokens": max(0, int(usage.get("prompt_tokens") or 0) - cached - written),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def message_from_chat(answer: Mapping[str, Any], model: str,
                      native: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A chat completion (one choice) as a Messages answer; the routing block stays `localroute`.
    `native`: the answer as a tier speaking Messages sent it, returned as it is but for the id,
    the model and the routing block."""
    if native is not None:
        passed = {**native, "id": message_id(str(answer.get("id", ""))), "model": model}
        if "localroute" in answer:
            passed["localroute"] = answer["localroute"]
        return passed
    choice = answer["choices"][0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = _text_of(msg.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    if msg.get("refusal"):
        content.append({"type": "text", "text": msg["refusal"]})
    for i, call in enumerate(msg.get("tool_calls") or ()):
        if call.get("type", "function") != "function":
            untranslatable(f"choices.0.message.tool_calls.{i}", f"a {call.get('type')} tool call")
        f = call["function"]
        content.append({"type": "tool_use", "id": call["id"], "name": f["name"],
                        "input": arguments_object(f.get("arguments", ""), f"tool_calls.{i}")})
    out: dict[str, Any] = {
        "id": message_id(str(answer.get("id", ""))),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "refusal" if msg.get("refusal") else stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": usage_from_chat(answer.get("usage")),
    }
    if "localroute" in answer:
        out["localroute"] = answer["localroute"]
    return out


# ---- streams: chat chunks -> Messages events ----


Event = tuple[str, dict[str, Any]]


def _block_events(index: int, block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One content block as its content_block_start, deltas and content_block_stop."""
    kind = block.get("type")
    start: dict[str, Any] = dict(block)
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start["text"] = ""
        if block.get("text"):
            deltas.append({"type": "text_delta", "text": block["text"]})
        if block.get("citations") is not None:
            start["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in block["citations"]]
    elif kind == "tool_use":
        start["input"] = {}
        if block.get("input"):
            deltas.append({"type": "input_json_delta",
                           "partial_json": json.dumps(block["input"], ensure_ascii=False, separators=(",", ":"))})
    elif kind == "thinking":
        start.update(thinking="", signature="")
        if block.get("thinking"):
            deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    # any other block (redacted_thinking, server_tool_use, a tool's result, ...): started as sent
    return [{"type": "content_block_start", "index": index, "content_block": start},
            *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
            {"type": "content_block_stop", "index": index}]


def message_events(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A whole Messages answer (a buffered answer of a tier speaking Messages, sent to a client
    that streams) as the events that tier would have streamed: message_start, every content block
    as sent (text with its citations, tool_use, thinking with its signature, redacted_thinking,
    server tools' blocks, in order), message_delta with the stop reason and the usage, message_stop."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for i, block in enumerate(message.get("content") or ()):
        events += _block_events(i, block)
    delta = {k: message.get(k) for k in ("stop_reason", "stop_sequence")}
    if "container" in message:
        delta["container"] = message["container"]
    events += [{"type": "message_delta", "delta": delta, "usage": message.get("usage") or {}},
               {"type": "message_stop"}]
    return events


class MessagesStream:
    """Chat chunks in, Messages events out: `start()`, `feed(chunk)` per chunk, `finish()` once.
    One content block is open at a time (text, or one tool_use per chat tool call, in order).
    `native`: the chunks come from a tier speaking Messages and carry its events
    (NATIVE_EVENTS), or its buffered answer (NATIVE_ANSWER: as `message_events`): those go out as sent, but for the id and model in `message_start` and the
    routing block added to `message_delta` (held, with what follows it, until the last chunk)."""

    def __init__(self, message_id: str, model: str, native: bool = False) -> None:
        self.id, self.model, self.native = message_id, model, native
        self._tail: list[Event] | None = None  # native: message_delta and after, until finish()
        self._index = -1
        self._open: str | None = None  # "text" or "tool:<chat tool index>"
        self._stop: str | None = None
        self._usage: Mapping[str, Any] | None = None
        self._routing: Any = None
        self.failed = False

    def start(self) -> list[Event]:
        if self.native:
            return []
        message: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        self._index += 1
        self._open = kind
        return events + [("content_block_start", {"type": "content_block_start", "index": self._index,
                                                   "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}

    def _text(self, text: str) -> list[Event]:
        events = [] if self._open == "text" else self._begin("text", {"type": "text", "text": ""})
        return events + [self._delta({"type": "text_delta", "text": text})]

    def _feed_native(self, chunk: Mapping[str, Any]) -> list[Event]:
        if chunk.get("localroute") is not None:
            self._routing = chunk["localroute"]
        out: list[Event] = []
        answer = chunk.get(NATIVE_ANSWER)
        for event in chunk.get(NATIVE_EVENTS) or (message_events(answer) if isinstance(answer, dict) else ()):
            kind = str(event.get("type", ""))
            if kind == "message_start":
                event = {**event, "message": {**event.get("message", {}), "id": self.id, "model": self.model}}
            if kind == "message_delta" and self._tail is None:
                self._tail = []
            (out if self._tail is None else self._tail).append((kind, event))
        return out

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        if self.native and chunk.get("error") is None:
            return self._feed_native(chunk)
        if chunk.get("error") is not None:
            self.failed = True
            err = chunk["error"]
            return self._close() + [("error", {"type": "error", "error": {
                "type": "api_error", "message": str(err.get("message", "error") if isinstance(err, dict) else err)}})]
        events: list[Event] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if chunk.get("localroute") is not None:
            self._routing = chunk["localroute"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            for key in ("content", "refusal"):
                if delta.get(key):
                    events += self._text(delta[key])
            if delta.get("refusal"):
                self._stop = "refusal"
            for call in delta.get("tool_calls") or ():
                kind = f"tool:{call.get('index', 0)}"
                f = call.get("function") or {}
                if call.get("id"):
                    events += self._begin(kind, {"type": "tool_use", "id": call["id"], "name": f.get("name", ""),
                                                 "input": {}})
                elif self._open != kind:
                    untranslatable("tool_calls", "tool call deltas interleaved across calls")
                if f.get("arguments"):
                    events.append(self._delta({"type": "input_json_delta", "partial_json": f["arguments"]}))
            if choice.get("finish_reason") is not None:
                self._stop = self._stop or stop_reason(choice["finish_reason"])
                events += self._close()
        return events

    def finish(self) -> list[Event]:
        if self.failed:
            return []
        if self.native:
            tail = self._tail or []
            return [(kind, {**event, "localroute": self._routing})
                    if kind == "message_delta" and self._routing is not None else (kind, event) for kind, event in tail]
        usage = usage_from_chat(self._usage)
        delta: dict[str, Any] = {"type": "message_delta",
                                 "delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": None},
                                 "usage": usage}
        if self._routing is not None:
            delta["localroute"] = self._routing
        return self._close() + [("message_delta", delta), ("message_stop", {"type": "message_stop"})]
