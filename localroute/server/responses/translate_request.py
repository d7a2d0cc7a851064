"""Responses requests -> Chat Completions requests, as pure functions over JSON dicts: `to_chat`
(and back with `from_chat`, which the round-trip tests use), and `native_body`, the body a tier
speaking the Responses API gets. Answers go the other way (translate_answer.py). Field pairs:

- `instructions` -> a leading system message; a string `input` -> one user message; message items
  -> messages (`input_text`/`output_text` -> text parts, `input_image` -> `image_url`,
  `input_file` -> `file`, `refusal` -> refusal part); `function_call` items -> the assistant's
  `tool_calls` (call_id -> id); `function_call_output` -> a `tool` message (call_id -> tool_call_id).
- Flat function tools -> chat's nested `function`; `tool_choice` {function, name} ->
  {function: {name}}, allowed_tools likewise; `text.format` -> `response_format` (json_schema
  nested under `json_schema`); `text.verbosity` -> `verbosity`; `reasoning.effort` ->
  `reasoning_effort`; `max_output_tokens` -> `max_completion_tokens`; include
  `message.output_text.logprobs` -> `logprobs`; temperature, top_p, top_logprobs,
  parallel_tool_calls, metadata, user, safety_identifier, prompt_cache_key, prompt_cache_retention,
  service_tier as they are.

Responses-only: hosted (non-function) tools and their call items sent back, reasoning items sent
back, truncation auto, `max_tool_calls`, other `include` values, reasoning summaries, annotations sent back, `phase`.
Given a `needs` set (the endpoint does), they are the need "responses_api": the request goes only
to a tier speaking the Responses API, which gets the body as sent (`native_body`), and the chat
body leaves them out; without one, a 400 naming the field. Always refused with a 400 naming the
field: the stateful provider features (`conversation`, stored `prompt`s, background mode), file
ids for images, file URLs, tool namespaces, tool choices naming hosted tools. `store` /
`previous_response_id` are the server's (serving.py), never a tier's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from localroute.backends.responses_wire import LOGPROBS_INCLUDE
from localroute.routing.categories import strip_category
from localroute.server.responses.protocol import PROVIDER_ITEMS, is_item_reference
from localroute.server.translate import refuse_set, untranslatable

__all__ = ["LOGPROBS_INCLUDE", "conversation_items", "from_chat", "input_items", "is_item_history", "items_from_chat",
           "native_body", "to_chat"]

_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "conversation": (), "prompt": (), "access_programs": (), "background_options": (), "image": (),
    "background": (False,),
}
# no chat counterpart, but a Responses tier serves them from the body as sent (need "responses_api")
_NATIVE_ONLY: dict[str, tuple[Any, ...]] = {
    "prompt_cache_options": (), "context_management": (), "moderation": (), "max_tool_calls": (),
    "truncation": ("disabled",),
}
_NATIVE_REASONING = ("summary", "generate_summary", "context", "mode")
_SAME = ("temperature", "top_p", "top_logprobs", "parallel_tool_calls", "metadata", "user", "safety_identifier",
         "prompt_cache_key", "prompt_cache_retention", "service_tier")


# ---- requests: Responses -> chat ----


class _Context:
    """Where to_chat records that the body asks for what only a Responses tier serves (None: refuse it)."""

    def __init__(self, needs: set[str] | None) -> None:
        self.needs = needs

    def need(self, param: str, why: str = "") -> None:
        if self.needs is None:
            untranslatable(param, why)
        self.needs.add("responses_api")

    def refuse_set(self, obj: Mapping[str, Any], where: str, fields: Mapping[str, tuple[Any, ...]]) -> None:
        for name, harmless in fields.items():
            if name in obj and obj[name] is not None and obj[name] not in harmless:
                self.need(f"{where}{name}")


def to_chat(body: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = (),
            needs: set[str] | None = None) -> dict[str, Any]:
    """A validated Responses body as a Chat Completions body; `history` is the stored conversation
    `previous_response_id` names (`conversation_items`; instructions are not carried over): its
    items as chat messages, less those chat cannot carry (reasoning, hosted tools' items,
    annotations: a Responses tier gets them all, `native_body`), which neither refuse the turn nor
    keep it off the chat tiers: they are the provider's own output, not the client's ask.
    `needs`: where a field with no chat counterpart that a Responses tier serves (reasoning
    summaries, other `include` values, truncation, annotations sent back, ...) is recorded as the
    need "responses_api" and left out of the chat body; without it, such a field is a 400."""
    refuse_set(body, "", _UNSUPPORTED)
    ctx = _Context(needs)
    ctx.refuse_set(body, "", _NATIVE_ONLY)
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": body["instructions"]})
    if not is_item_history(history):  # a row stored before items were: its chat messages
        messages.extend(dict(m) for m in history)
    else:
        _items([_plain_turn(item) for item in history], messages, _Context(set()), "previous_response_id")
    if isinstance(body["input"], str):
        messages.append({"role": "user", "content": body["input"]})
    else:
        _items(body["input"], messages, ctx, "input")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    for name in _SAME:
        if body.get(name) is not None:
            chat[name] = body[name]
    include = body.get("include") or []
    for i, value in enumerate(include):
        if value != LOGPROBS_INCLUDE:
            ctx.need(f"include.{i}", f"{value!r}")
    if LOGPROBS_INCLUDE in include or (body.get("top_logprobs") or 0) > 0:
        chat["logprobs"] = True
    text = body.get("text") or {}
    if text.get("format") is not None:
        chat["response_format"] = _format(text["format"])
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning")
    if reasoning is not None:
        ctx.refuse_set(reasoning, "reasoning.", {name: () for name in _NATIVE_REASONING})
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream") is not None:
        chat["stream"] = body["stream"]
        if body["stream"]:
            options: dict[str, Any] = {"include_usage": True}  # usage for response.completed
            include_obfuscation = (body.get("stream_options") or {}).get("include_obfuscation")
            if include_obfuscation is not None:
                options["include_obfuscation"] = include_obfuscation
            chat["stream_options"] = options
    if body.get("tools") is not None:
        for i, t in enumerate(body["tools"]):
            if t["type"] != "function":
                ctx.need(f"tools.{i}", f"a {t['type']!r} tool runs at the provider")
        functions = [_tool(t, f"tools.{i}") for i, t in enumerate(body["tools"]) if t["type"] == "function"]
        if functions or not body["tools"]:
            chat["tools"] = functions
    # hosted tools alone: "auto", "none" or "required" is theirs (the Responses tier reads it as sent)
    hosted_only = bool(body.get("tools")) and "tools" not in chat
    if body.get("tool_choice") is not None and not (hosted_only and isinstance(body["tool_choice"], str)):
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    return chat


def _format(fmt: Mapping[str, Any]) -> dict[str, Any]:
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    schema: dict[str, Any] = {"name": fmt["name"]}
    if fmt.get("description") is not None:
        schema["description"] = fmt["description"]
    schema["schema"] = fmt["schema"]
    if fmt.get("strict") is not None:
        schema["strict"] = fmt["strict"]
    return {"type": "json_schema", "json_schema": schema}


def _part(part: Mapping[str, Any], where: str, ctx: _Context) -> dict[str, Any]:
    ctx.refuse_set(part, f"{where}.", {"prompt_cache_breakpoint": ()})
    kind = part["type"]
    if kind in ("input_text", "output_text"):
        if part.get("annotations"):
            ctx.need(f"{where}.annotations")
        return {"type": "text", "text": part["text"]}  # logprobs of an earlier answer: bookkeeping
    if kind == "refusal":
        return {"type": "refusal", "refusal": part["refusal"]}
    if kind == "input_image":
        if part.get("image_url") is None:
            untranslatable(f"{where}.file_id", "images by file id need a file store; send image_url")
        refuse_set(part, f"{where}.", {"file_id": (), "detail": ("low", "high", "auto")})
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    refuse_set(part, f"{where}.", {"file_url": (), "detail": ()})
    file = {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k) is not None}
    return {"type": "file", "file": file}


def _content(content: str | list[Mapping[str, Any]], where: str, ctx: _Context) -> str | list[dict[str, Any]]:
    return content if isinstance(content, str) else [_part(p, f"{where}.{j}", ctx) for j, p in enumerate(content)]


def _plain_turn(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stored assistant message of output text alone, with its text as one string (the chat
    message a chat tier was always sent for an earlier answer)."""
    content = item.get("content")
    if item.get("type", "message") != "message" or item.get("role") != "assistant" or not isinstance(content, list) \
            or not all(p.get("type") == "output_text" for p in content):
        return item
    return {**item, "content": "".join(p.get("text", "") for p in content)}


def _items(items: Sequence[Mapping[str, Any]], messages: list[dict[str, Any]], ctx: _Context, at: str) -> None:
    for i, item in enumerate(items):
        where = f"{at}.{i}"
        kind = "item_reference" if is_item_reference(item) else item.get("type", "message")
        if kind == "message":
            ctx.refuse_set(item, f"{where}.", {"phase": ()})
            messages.append({"role": item["role"], "content": _content(item["content"], f"{where}.content", ctx)})
        elif kind == "reasoning":  # an earlier answer's reasoning: the Responses tier reads it
            ctx.need(where, "chat has no reasoning items")
            continue
        elif kind in PROVIDER_ITEMS:  # an earlier answer's hosted tool call: likewise
            ctx.need(where, f"chat has no {kind} items")
            continue
        elif kind == "item_reference":  # the server resolves them (serving.py) before translating
            untranslatable(where, "an item_reference is resolved against the response store first")
        elif kind == "function_call":
            refuse_set(item, f"{where}.", {"namespace": (), "caller": ({"type": "direct"},)})
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("_from_items"):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            refuse_set(item, f"{where}.", {"namespace": (), "caller": ({"type": "direct"},)})
            output = item["output"]
            if not isinstance(output, str):
                for j, part in enumerate(output):
                    if part["type"] != "input_text":
                        untranslatable(f"{where}.output.{j}", "chat tool results carry text only")
                output = _content(output, f"{where}.output", ctx)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        if kind == "message" and item["role"] == "assistant":
            messages[-1]["_from_items"] = True
    for m in messages:
        m.pop("_from_items", None)


def _tool(tool: Mapping[str, Any], where: str) -> dict[str, Any]:
    refuse_set(tool, f"{where}.", {"defer_loading": (False,), "allowed_callers": (), "output_schema": ()})
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    if tool.get("parameters") is not None:
        function["parameters"] = tool["parameters"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _named(tool: Mapping[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
        untranslatable("tool_choice.tools", "only function tools")
    return {"type": "function", "function": {"name": tool["name"]}}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if choice["type"] == "function":
        return _named(choice)
    return {"type": "allowed_tools", "allowed_tools": {"mode": choice["mode"],
                                                       "tools": [_named(t) for t in choice["tools"]]}}


# ---- requests: chat -> Responses (the inverse, for round trips) ----


def from_chat(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The Responses body that `to_chat` maps onto `chat` (item ids and status aside)."""
    body: dict[str, Any] = {"model": chat["model"]}
    messages = list(chat["messages"])
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        body["instructions"] = messages.pop(0)["content"]
    body["input"] = items_from_chat(messages)
    if "max_completion_tokens" in chat:
        body["max_output_tokens"] = chat["max_completion_tokens"]
    for name in _SAME:
        if name in chat:
            body[name] = chat[name]
    if chat.get("logprobs"):
        body["include"] = [LOGPROBS_INCLUDE]
    text: dict[str, Any] = {}
    if "response_format" in chat:
        rf = chat["response_format"]
        text["format"] = {"type": "json_schema", **rf["json_schema"]} if rf["type"] == "json_schema" else rf
    if "verbosity" in chat:
        text["verbosity"] = chat["verbosity"]
    if text:
        body["text"] = text
    if "reasoning_effort" in chat:
        body["reasoning"] = {"effort": chat["reasoning_effort"]}
    if "stream" in chat:
        body["stream"] = chat["stream"]
        extra = {k: v for k, v in (chat.get("stream_options") or {}).items() if k != "include_usage"}
        if extra:
            body["stream_options"] = extra
    if "tools" in chat:
        body["tools"] = [{"type": "function", "name": t["function"]["name"],
                          **({"description": t["function"]["description"]} if "description" in t["function"] else {}),
                          "parameters": t["function"].get("parameters"), "strict": t["function"].get("strict")}
                         for t in chat["tools"]]
    if "tool_choice" in chat:
        tc = chat["tool_choice"]
        if isinstance(tc, str):
            body["tool_choice"] = tc
        elif tc["type"] == "function":
            body["tool_choice"] = {"type": "function", "name": tc["function"]["name"]}
        else:
            body["tool_choice"] = {"type": "allowed_tools", "mode": tc["allowed_tools"]["mode"], "tools": [
                {"type": "function", "name": t["function"]["name"]} for t in tc["allowed_tools"]["tools"]]}
    return body


def items_from_chat(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as Responses input items (the inverse of `to_chat`'s item translation)."""
    items: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            out = m["content"]
            out = out if isinstance(out, str) else [{"type": "input_text", "text": p["text"]} for p in out]
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": out})
            continue
        if m.get("content") is not None:
            items.append({"role": m["role"], "content": _parts_back(m["content"], m["role"])})
        for c in m.get("tool_calls") or ():
            items.append({"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                          "arguments": c["function"]["arguments"]})
    return items


def _parts_back(content: Any, role: str) -> Any:
    if isinstance(content, str):
        return content
    out: list[dict[str, Any]] = []
    for p in content:
        if p["type"] == "text":
            out.append({"type": "output_text", "text": p["text"], "annotations": []} if role == "assistant"
                       else {"type": "input_text", "text": p["text"]})
        elif p["type"] == "refusal":
            out.append({"type": "refusal", "refusal": p["refusal"]})
        elif p["type"] == "image_url":
            out.append({"type": "input_image", "image_url": p["image_url"]["url"],
                        **({"detail": p["image_url"]["detail"]} if "detail" in p["image_url"] else {})})
        else:
            out.append({"type": "input_file", **p["file"]})
    return out


# ---- passthrough: a tier speaking the Responses API (responses_api = true) ----


def native_body(body: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The body a Responses tier gets: the client's, with localroute's own metadata keys removed
    and the conversation state localroute's: the stored turns `previous_response_id` names go in
    front of `input` as items (the id itself, one the provider never issued, is not sent), and
    `store` is false (localroute keeps the Response; a provider copy would sit under an id no
    client sees). With nothing stored there, a reasoning item sent back by id alone (no
    `encrypted_content`, no reasoning `content` as open-weight servers send it) names nothing the
    tier has (OpenAI answers 404 "Items are not persisted when `store` is set to false"): it is
    left out; one that carries its reasoning goes as sent."""
    out = strip_category(dict(body))
    if "previous_response_id" in out:
        del out["previous_response_id"]
        stored = history if is_item_history(history) else items_from_chat(history)
        out["input"] = [*stored, *input_items(out["input"])]
    if not isinstance(out["input"], str):
        out["input"] = [item for item in out["input"] if item.get("type") != "reasoning"
                        or item.get("encrypted_content") or item.get("content")]
    out["store"] = False
    return out


def input_items(value: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A request's `input` as items (a string: one user message)."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else [dict(item) for item in value]


def conversation_items(history: Sequence[Mapping[str, Any]], body: Mapping[str, Any],
                       output: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation a stored Response continues: the turns before it, its request's input
    items and its output items, every one as sent (reasoning, hosted tools' items, annotations:
    a later turn to a Responses tier sends them back), each with its `type` (is_item_history)."""
    earlier = history if is_item_history(history) else items_from_chat(history)
    return [{"type": "message", **item} if "type" not in item else dict(item)
            for item in [*earlier, *input_items(body["input"]), *output]]


def is_item_history(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a stored conversation is Responses items (each with a `type`), not the chat
    messages (none has one) a row held before items were stored."""
    return all("type" in m for m in history)
