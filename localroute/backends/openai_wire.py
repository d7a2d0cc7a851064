"""The OpenAI Chat Completions wire format, apart from the transport (openai_http.py runs the
calls: deadlines, retries, the breaker, the budget). Pure functions over JSON dicts:

- request bodies: the client's own body forwarded (`chat_body`: only `model`, `stream` and
  `stream_options.include_usage` set for the call), a Completions body as one user message
  (`from_completion`), or one built from the internal request alone (`built_body`);
- answers: a chat.completion read into what the cascade judges (`read_answer`), logprobs asked for
  on the client's behalf taken out again (`as_client_asked`);
- streams: chat.completion.chunk dicts gathered into the same (`ChunkReader`).

A subclass speaking another API (anthropic_http.py, the Responses passthrough of openai_http.py)
decodes its provider's answers and events into these chat shapes first. A decoder for a client
that spoke the provider's own API (`GenerationRequest.native`) also keeps each provider event, in
order, on the chunk it produced (`NATIVE_EVENTS`); an event with no chat meaning (a ping, a
thinking delta) rides on a chunk of its own with no choices, so the HTTP edge can hand the
client the provider's stream event for event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from localroute.types import FinishReason, GenerationRequest, TokenLogprob, TopLogprob

__all__ = ["NATIVE_ANSWER", "NATIVE_EVENTS", "Answer", "ChunkReader", "as_client_asked", "ask_logprobs", "built_body",
           "chat_body", "finish_reason", "from_completion", "message_text", "native_chunk", "read_answer", "same",
           "token_logprob"]

# key of a decoded chat chunk: the provider's own events it came from (native requests only)
NATIVE_EVENTS = "localroute_native_events"
# key of the chunk a buffered answer of a native request is streamed as: the provider's answer as
# sent (Generation.extra["native"]), for the HTTP edge to stream as that API's events, every item kept
NATIVE_ANSWER = "localroute_native_answer"
# key of a chunk of native events alone: they are generated output (for the stream's deadlines)
_PROGRESS = "localroute_progress"

_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# Completions fields with no Chat Completions counterpart (logprobs is translated)
_COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of", "logprobs"})


# a content part that is not text, as it reads in a message's text view
_PART_PLACEHOLDERS = {"image_url": "[image]", "input_audio": "[audio]", "file": "[file]"}


def message_text(message: Mapping[str, Any]) -> str:
    """A chat message's text view: its content (text parts joined, other parts as a placeholder
    such as `[image]`, a refusal as written) and, for an assistant turn, each tool call as
    `[calls NAME(ARGUMENTS)]` (the legacy function_call alike). What a judge reads of a turn, and
    what a local token estimate counts."""
    content = message.get("content")
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text" or (kind is None and "text" in part):
                parts.append(str(part.get("text") or ""))
            elif kind == "refusal":
                parts.append(str(part.get("refusal") or ""))
            else:
                parts.append(_PART_PLACEHOLDERS.get(str(kind), f"[{kind}]"))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append(message["refusal"])
    calls = [c.get("function") for c in message.get("tool_calls") or () if isinstance(c, Mapping)]
    if isinstance(message.get("function_call"), Mapping):
        calls.append(message["function_call"])
    for fn in calls:
        if isinstance(fn, Mapping):
            parts.append(f"[calls {fn.get('name', '')}({fn.get('arguments', '')})]")
    return "\n".join(p for p in parts if p)


def same(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """The chunk decoder of a provider that speaks chat: the identity."""
    return chunk


def native_chunk(event: dict[str, Any], progress: bool) -> dict[str, Any]:
    """A provider event with no chat meaning, as a chunk of its own. `progress`: the event is
    generated output (a thinking or reasoning delta): it counts against no first-token deadline."""
    return {"choices": [], NATIVE_EVENTS: [event], _PROGRESS: progress}


def finish_reason(reason: str | None) -> FinishReason:
    return cast(FinishReason, reason) if reason in _FINISH_REASONS else "stop"


def _bytes(item: Mapping[str, Any]) -> tuple[int, ...] | None:
    raw = item.get("bytes")
    return tuple(raw) if isinstance(raw, list) else None


def token_logprob(item: Mapping[str, Any]) -> TokenLogprob:
    top = tuple(
        TopLogprob(token=str(a.get("token", "")), logprob=float(a.get("logprob", 0.0)), bytes=_bytes(a))
        for a in item.get("top_logprobs") or ()
        if isinstance(a, dict)
    )
    return TokenLogprob(token_id=-1, token=str(item.get("token", "")), logprob=float(item.get("logprob", 0.0)),
                        bytes=_bytes(item), top_logprobs=top)


# ---- request bodies ----


def chat_body(request: GenerationRequest, model: str, stream: bool, confidence_logprobs: bool) -> dict[str, Any]:
    """The Chat Completions body for one call to `model`: the client's own when it sent one."""
    wire = request.wire
    if wire is None:
        body = built_body(request, model, stream)
        if confidence_logprobs and not stream:
            ask_logprobs(body, request.params.top_logprobs)
        return body
    body = dict(wire.body) if wire.api == "chat" else from_completion(wire.body)
    body["model"] = model
    if stream:
        body["stream"] = True
        options = body.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        if not options.get("include_usage"):
            options["include_usage"] = True
        body["stream_options"] = options
    else:  # a buffered (non-final) call of a client's stream is not streamed
        if "stream" in body:
            body["stream"] = False
        body.pop("stream_options", None)
        if confidence_logprobs:
            ask_logprobs(body, request.params.top_logprobs)
    return body


def from_completion(completion: Mapping[str, Any]) -> dict[str, Any]:
    """A Completions body as a Chat Completions one: the prompt as the user's message."""
    body = {k: v for k, v in completion.items() if k not in _COMPLETION_ONLY}
    prompt = completion.get("prompt")
    body["messages"] = [{"role": "user", "content": prompt[0] if isinstance(prompt, list) else prompt}]
    k = completion.get("logprobs")
    if isinstance(k, int) and not isinstance(k, bool):
        body["logprobs"] = True
        if k:
            body["top_logprobs"] = k
    return body


def built_body(request: GenerationRequest, model: str, stream: bool) -> dict[str, Any]:
    """A body from the internal request alone (no client body: `localroute ask`, evaluation)."""
    p = request.params
    messages = list(request.messages or [{"role": "user", "content": request.prompt or ""}])
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": stream,
    }
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = p.top_logprobs
    if p.response_format is not None:
        body["response_format"] = p.response_format
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def ask_logprobs(body: dict[str, Any], top_logprobs: int) -> None:
    """A non-final tier's call asks for the logprobs its confidence is computed from."""
    body["logprobs"] = True
    if top_logprobs > int(body.get("top_logprobs") or 0):
        body["top_logprobs"] = top_logprobs


# ---- answers ----


@dataclass(frozen=True, slots=True)
class Answer:
    """What the cascade reads of a chat.completion: choice 0's text, logprobs and finish."""

    text: str
    tokens: list[TokenLogprob]
    finish: FinishReason
    usage: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


def read_answer(data: Mapping[str, Any]) -> Answer:
    """Raises ValueError, KeyError, IndexError, TypeError or AttributeError on a malformed answer."""
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    tokens = [token_logprob(t) for t in ((choice.get("logprobs") or {}).get("content") or [])]
    usage = data.get("usage") or {}
    if not isinstance(text, str) or not isinstance(usage, dict):
        raise TypeError("bad types")
    return Answer(text, tokens, finish_reason(choice.get("finish_reason")), usage,
                  int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", len(tokens))))


def as_client_asked(data: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
    """The answer as the client asked for it: logprobs we asked for on its behalf removed, top
    lists cut to its own top_logprobs."""
    wire = request.wire.body if request.wire is not None else {}
    asked = wire.get("logprobs")
    if request.wire is not None and request.wire.api == "completions":
        asked = isinstance(asked, int) and not isinstance(asked, bool)
        k = int(wire.get("logprobs") or 0) if asked else 0
    else:
        k = int(wire.get("top_logprobs") or 0) if asked else 0
    if asked is True and k >= request.params.top_logprobs:
        return data
    choices = []
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            choices.append(choice)
            continue
        lp = choice.get("logprobs")
        if not asked:
            lp = None
        elif isinstance(lp, dict) and isinstance(lp.get("content"), list):
            lp = {**lp, "content": [{**t, "top_logprobs": (t.get("top_logprobs") or [])[:k]}
                                    if isinstance(t, dict) else t for t in lp["content"]]}
        choices.append({**choice, "logprobs": lp})
    return {**data, "choices": choices}


# ---- streams ----


@dataclass(slots=True)
class ChunkReader:
    """One stream's chat chunks gathered: choice 0's text and logprobs (the choice the cascade
    judges), the usage, the finish reason and the model."""

    model: str
    parts: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    finish: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> tuple[str, TokenLogprob | None, bool]:
        """Choice 0's new text and last token, and whether the chunk says anything: besides the
        opening role, tool calls, refusals, audio, a finish, or a native event that is output."""
        self.usage = chunk.get("usage") or self.usage
        self.model = chunk.get("model", self.model)
        text, token, substance = "", None, bool(chunk.get(_PROGRESS))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            self.finish = choice.get("finish_reason") or self.finish
            new = [token_logprob(t) for t in ((choice.get("logprobs") or {}).get("content") or [])]
            if choice.get("index", 0) == 0:
                self.tokens.extend(new)
                self.parts.append(content)
                text, token = text + content, new[-1] if new else token
            substance = substance or bool(content or choice.get("finish_reason")
                                          or any(v for k, v in delta.items() if k != "role"))
        return text, token, substance
