"""A remote tier that speaks Anthropic Messages (`POST {base_url}/messages`): Anthropic's API, or
any gateway that speaks it. Everything but the wire format is the OpenAI-compatible backend's
(openai_http.py): deadlines, retries, the circuit breaker, the spend budget, key scrubbing.

- A Messages request (the client spoke `/v1/messages`; `GenerationRequest.native`) is forwarded
  as the client sent it, with only `model` replaced and `stream` set for this call; the answer is
  kept as sent (`Generation.extra["native"]`) and the Messages endpoint returns it unchanged but
  for localroute's id, model and routing block. A streamed one is decoded event by event for the
  chat path (text, tool calls, finish, usage: what the cascade and the budget read), each chunk
  keeping the events it came from, so the Messages endpoint returns the provider's events as sent
  (thinking and redacted_thinking blocks, signature deltas, `stop_sequence`, pings), with only
  localroute's id, model and routing block set. `system`-role messages (accepted by
  /v1/messages for local tiers) are moved into `system`, where the Messages API takes them.
- A Chat Completions or Completions request is translated (`messages_request`): system and
  developer messages -> `system`, tool calls and results -> `tool_use` / `tool_result` blocks,
  images -> image blocks, `stop` -> `stop_sequences`, `response_format` json_schema ->
  `output_config.format`, `user` -> `metadata.user_id`, `tool_choice` / `parallel_tool_calls` ->
  `tool_choice`. `max_tokens` is required by the API: the request's own, else `default_max_tokens`.
  Fields with no Messages counterpart that would change the answer (`logprobs`, `n` > 1,
  `logit_bias`, penalties, audio, `response_format` json_object, `prediction`) are a 400 naming the
  field; capability routing (backends/capabilities.py) keeps such requests off this tier before
  that. Hints with no counterpart (`seed`, `store`, `metadata`, `stream_options`, ...) are not sent.
- The answer is translated to a chat.completion (`chat_completion`), each stream event to a chat
  chunk (`ChunkDecoder`): text blocks -> content, `tool_use` -> tool_calls (input -> arguments
  JSON), `stop_reason` -> finish_reason, usage -> prompt/completion tokens (cache reads and writes
  counted in prompt_tokens, as chat counts them). Thinking blocks are not carried to chat clients.
- Auth: `x-api-key` and `anthropic-version` headers. A Messages request's own `anthropic-version`
  and `anthropic-beta` headers (`WireRequest.headers`) go to the tier as the client sent them (the
  version over the default): a client using a beta feature gets it. A translated request carries
  none (a chat client sent none).
- No token logprobs: as a non-final tier it has no confidence, so it belongs at the top of a ladder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from localroute.backends.capabilities import DEFAULTS
from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.backends.openai_http import from_settings as _remote_from_settings
from localroute.backends.openai_wire import NATIVE_EVENTS, native_chunk
from localroute.errors import InvalidRequestError
from localroute.types import GenerationRequest

if TYPE_CHECKING:
    from localroute.settings import Settings, TierSettings

__all__ = ["ANTHROPIC_VERSION", "AnthropicHTTPBackend", "ChunkDecoder", "blocks_from_parts", "chat_completion",
           "from_settings", "messages_request", "tool_choice_from_chat", "tool_from_chat"]

ANTHROPIC_VERSION = "2023-06-01"
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
          "refusal": "content_filter", "pause_turn": "stop", "model_context_window_exceeded": "length"}
# chat fields that change the answer and that Messages cannot express: refused, never dropped
_REFUSED = ("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "audio",
            "prediction", "functions", "function_call", "web_search_options", "reasoning_effort", "verbosity")
# chat fields carried elsewhere, or hints with no Messages counterpart that are not sent
_HANDLED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stop", "temperature", "top_p",
                      "top_k", "user", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
                      "response_format", "n", "seed", "store", "metadata", "service_tier", "modalities",
                      "safety_identifier", "prompt_cache_key", "prompt_cache_retention", *_REFUSED})
_SERVICE_TIER = {"auto": "auto", "default": "standard_only"}


def _refuse(param: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: the Anthropic Messages tier cannot serve it ({why}); remove it",
                               param=param, code="unsupported_field")


# ---- requests: chat -> Messages ----


def _is_base64_url(url: str) -> bool:
    return url.startswith("data:") and ";base64," in url


def blocks_from_parts(content: Any) -> Any:
    """Chat content (a string, or text / image_url / file parts) as Messages content."""
    if isinstance(content, str) or content is None:
        return content or ""
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": part["text"]}
        elif kind == "image_url":
            url = part["image_url"]["url"]
            if _is_base64_url(url):
                media_type, data = url[5:].split(";base64,", 1)
                block = {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
            else:
                block = {"type": "image", "source": {"type": "url", "url": url}}
        elif kind == "file" and _is_base64_url(str((part.get("file") or {}).get("file_data", ""))):
            media_type, data = part["file"]["file_data"][5:].split(";base64,", 1)
            block = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
        else:
            raise _refuse("messages", f"a {kind!r} content part")
        if "cache_control" in part:
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def tool_from_chat(tool: Mapping[str, Any]) -> dict[str, Any]:
    if tool.get("type", "function") != "function":
        raise _refuse("tools", f"a {tool.get('type')!r} tool")
    f = tool["function"]
    out: dict[str, Any] = {"name": f["name"]}
    if "description" in f:
        out["description"] = f["description"]
    out["input_schema"] = f.get("parameters") or {"type": "object", "properties": {}}
    if "strict" in f:
        out["strict"] = f["strict"]
    if "cache_control" in tool:
        out["cache_control"] = tool["cache_control"]
    return out


def tool_choice_from_chat(choice: Any, parallel: bool | None) -> dict[str, Any]:
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if not isinstance(name, str):
            raise _refuse("tool_choice", f"a {choice.get('type')!r} tool choice")
        out: dict[str, Any] = {"type": "tool", "name": name}
    else:
        kind = {"auto": "auto", "required": "any", "none": "none"}.get(choice or "auto")
        if kind is None:
            raise _refuse("tool_choice", f"tool_choice {choice!r}")
        out = {"type": kind}
    if parallel is not None and out["type"] != "none":
        out["disable_parallel_tool_use"] = not parallel
    return out


def _arguments(arguments: Any, where: str) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        raise _refuse(where, "tool call arguments that are not JSON") from None
    if not isinstance(value, dict):
        raise _refuse(where, "tool call arguments that are not a JSON object")
    return value


def _turns(messages: list[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Leading system/developer messages as system blocks; the rest as alternating turns (a tool
    result opens or joins a user turn; consecutive same-role messages are one turn)."""
    system: list[dict[str, Any]] = []
    i = 0
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        content = blocks_from_parts(messages[i].get("content"))
        system += [{"type": "text", "text": content}] if isinstance(content, str) else content
        i += 1
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:  # an empty chat message: Messages refuses empty turns
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})

    for j, m in enumerate(messages[i:], start=i):
        role = m.get("role")
        content = blocks_from_parts(m.get("content"))
        blocks = ([{"type": "text", "text": content}] if content else []) if isinstance(content, str) else content
        if role == "user":
            add("user", blocks)
        elif role == "assistant":
            if m.get("refusal"):
                blocks = blocks + [{"type": "text", "text": m["refusal"]}]
            for k, call in enumerate(m.get("tool_calls") or ()):
                if call.get("type", "function") != "function":
                    raise _refuse(f"messages.{j}.tool_calls.{k}", f"a {call.get('type')!r} tool call")
                blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                               "input": _arguments(call["function"].get("arguments"), f"messages.{j}.tool_calls.{k}")})
            add("assistant", blocks)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": content}
            add("user", [result])
        else:  # a system message after the conversation started, or a legacy function message
            raise _refuse(f"messages.{j}.role", f"a {role!r} message after the first turn")
    for t in turns:  # a turn of one text block is sent as a plain string, as clients write it
        if len(t["content"]) == 1 and t["content"][0].get("type") == "text" and len(t["content"][0]) == 2:
            t["content"] = t["content"][0]["text"]
    return system, turns


def messages_request(chat: Mapping[str, Any], model: str, default_max_tokens: int, stream: bool) -> dict[str, Any]:
    """A Chat Completions body as a Messages body for `model`."""
    for name in _REFUSED:
        if chat.get(name):
            raise _refuse(name, "Messages has no such field")
    if (chat.get("n") or 1) > 1:
        raise _refuse("n", "one answer per call")
    modalities = chat.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise _refuse("modalities", "text answers only")
    unknown = sorted(k for k in chat if k not in _HANDLED)
    if unknown:
        raise _refuse(unknown[0], "no Messages counterpart")
    system, turns = _turns(list(chat["messages"]))
    body: dict[str, Any] = {"model": model,
                            "max_tokens": chat.get("max_completion_tokens") or chat.get("max_tokens") or default_max_tokens,
                            "messages": turns}
    if system:
        body["system"] = (system[0]["text"] if len(system) == 1 and len(system[0]) == 2 else system)
    stop = chat.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = chat.get("temperature")
    if temperature is not None:
        if not 0 <= temperature <= 1:
            raise _refuse("temperature", "Messages takes a temperature from 0 to 1")
        body["temperature"] = temperature
    # top_p 1 is no nucleus cut: not sent (current Claude models refuse temperature and top_p together)
    if chat.get("top_p") is not None and chat["top_p"] != 1:
        body["top_p"] = chat["top_p"]
    if chat.get("top_k") is not None:
        body["top_k"] = chat["top_k"]
    if chat.get("user"):
        body["metadata"] = {"user_id": chat["user"]}
    if chat.get("service_tier") in _SERVICE_TIER:
        body["service_tier"] = _SERVICE_TIER[chat["service_tier"]]
    if chat.get("tools"):
        body["tools"] = [tool_from_chat(t) for t in chat["tools"]]
        if chat.get("tool_choice") is not None or chat.get("parallel_tool_calls") is not None:
            body["tool_choice"] = tool_choice_from_chat(chat.get("tool_choice"), chat.get("parallel_tool_calls"))
    fmt = chat.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") not in (None, "text"):
        if fmt.get("type") != "json_schema":
            raise _refuse("response_format", f"type {fmt.get('type')!r}: Messages takes a JSON schema only")
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise _refuse("response_format", "a json_schema format without a schema")
        body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if stream:
        body["stream"] = True
    return body


# ---- answers: Messages -> chat ----


def _usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Messages usage as chat's: input_tokens excludes cached ones, prompt_tokens includes them."""
    usage = usage or {}
    cached = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + written
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written}}


def _call(block: Mapping[str, Any], index: int | None = None, arguments: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"id": block["id"], "type": "function", "function": {
        "name": block["name"], "arguments": json.dumps(block.get("input") or {}) if arguments is None else arguments}}
    return call if index is None else {"index": index, **call}


def chat_completion(answer: Mapping[str, Any]) -> dict[str, Any]:
    """A Messages answer as a chat.completion with one choice."""
    if answer.get("type") == "error":
        raise TypeError("an error object")
    text = "".join(b.get("text", "") for b in answer["content"] if b.get("type") == "text")
    calls = [_call(b) for b in answer["content"] if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return {"id": answer.get("id", ""), "object": "chat.completion", "created": int(time.time()),
            "model": answer.get("model", ""),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH.get(answer.get("stop_reason") or "end_turn", "stop")}],
            "usage": _usage(answer.get("usage"))}


class ChunkDecoder:
    """One stream's Messages events in, chat.completion.chunk dicts out (None: nothing to send).
    `message_start` opens the assistant turn, text deltas are content, a tool_use block is one tool
    call (its head at the block's start, its input JSON as argument deltas), `message_delta` the
    finish, `message_stop` the usage chunk. `native` (the client spoke Messages): every event is
    kept on the chunk it produced (openai_wire.NATIVE_EVENTS), and one with no chat meaning (a
    ping, a block's end, a thinking or signature delta) is a chunk of its own."""

    def __init__(self, native: bool = False) -> None:
        self.native = native
        self._base: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": ""}
        self._usage: dict[str, Any] = {}
        self._calls: dict[int, int] = {}  # content block index -> tool call index
        self._args: dict[int, bool] = {}  # content block index -> any argument text sent yet

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def __call__(self, event: dict[str, Any]) -> dict[str, Any] | None:
        chunk = self._decode(event)
        if not self.native or (chunk is not None and "error" in chunk):
            return chunk
        if chunk is None:
            return native_chunk(event, progress=event.get("type") == "content_block_delta")
        chunk[NATIVE_EVENTS] = [event]
        return chunk

    def _decode(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event.get("type")
        if kind == "message_start":
            message = event["message"]
            self._base.update(id=message.get("id", ""), model=message.get("model", ""))
            self._usage.update(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = event["content_block"]
            if block.get("type") == "tool_use":
                index = self._calls[event["index"]] = len(self._calls)
                given = block.get("input")  # normally {} with the input in deltas; a gateway may send it whole
                self._args[event["index"]] = bool(given)
                return self._chunk({"tool_calls": [_call(block, index, json.dumps(given) if given else "")]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return None
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta["text"]}) if delta["text"] else None
            if delta.get("type") == "input_json_delta" and event["index"] in self._calls:
                if not delta.get("partial_json"):
                    return None
                self._args[event["index"]] = True
                return self._chunk({"tool_calls": [{"index": self._calls[event["index"]],
                                                    "function": {"arguments": delta.get("partial_json", "")}}]})
            return None  # thinking and signature deltas are not carried to chat
        if kind == "content_block_stop" and event.get("index") in self._calls and not self._args.get(event["index"]):
            self._args[event["index"]] = True  # a call with no input: "{}", as the non-streamed answer says
            return self._chunk({"tool_calls": [{"index": self._calls[event["index"]], "function": {"arguments": "{}"}}]})
        if kind == "message_delta":
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason") or "end_turn"
            return self._chunk({}, FINISH.get(reason, "stop"))
        if kind == "message_stop":
            return {**self._base, "choices": [], "usage": _usage(self._usage)}
        if kind == "error":
            return {"error": event.get("error") or {}}
        return None  # ping, content_block_stop, and event types added later


# ---- the backend ----


def _hoist_system(body: dict[str, Any]) -> dict[str, Any]:
    """A native body with localroute's `system`-role messages (an extension /v1/messages accepts
    for local tiers) moved into `system`, which is where the Messages API takes them."""
    messages = body.get("messages") or []
    if not any(m.get("role") == "system" for m in messages):
        return body
    system = body.get("system") or []
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
    for m in messages:
        if m.get("role") == "system":
            content = m.get("content")
            blocks += [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    return {**body, "system": blocks, "messages": [m for m in messages if m.get("role") != "system"]}


class AnthropicHTTPBackend(OpenAIHTTPBackend):
    """A remote Anthropic Messages tier (see the module docstring)."""

    kind = "anthropic"
    capabilities = DEFAULTS["anthropic"]
    path = "/messages"

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(name, base_url, model, None, *args, **kwargs)
        self._api_key = api_key  # scrubbed from every error, as the bearer key is
        self._client.headers["anthropic-version"] = ANTHROPIC_VERSION
        if api_key:
            self._client.headers["x-api-key"] = api_key

    def _body(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        native = request.native
        if native is not None and native.api == "messages":
            body = _hoist_system(dict(native.body))
            body["model"] = self.model
            if stream:
                body["stream"] = True
            else:
                body.pop("stream", None)
            return body
        chat = super()._body(request, stream)
        if request.wire is None:  # localroute's own request (`ask`, eval): its logprobs ask is not the client's
            chat.pop("logprobs", None)
            chat.pop("top_logprobs", None)
        return messages_request(chat, self.model, request.params.max_tokens, stream)

    def _path(self, request: GenerationRequest) -> str:
        return self.path

    def _headers(self, request: GenerationRequest) -> tuple[tuple[str, str], ...]:
        native = request.native
        return native.headers if native is not None and native.api == "messages" else ()

    def _decode_answer(self, data: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
        return chat_completion(data)

    def _chunk_decoder(self, request: GenerationRequest) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
        return ChunkDecoder(native=request.native is not None and request.native.api == "messages")


def from_settings(tier: TierSettings, settings: Settings) -> AnthropicHTTPBackend:
    return _remote_from_settings(tier, settings, AnthropicHTTPBackend)
