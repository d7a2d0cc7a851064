"""The chat path as the other APIs (server/responses/, server/anthropic/) reach it: a translated
Chat Completions body in, the routed chat answer (a dict) or its chunks (dicts) out, through exactly
what `/v1/chat/completions` runs (serving.serve_chat: policies, routing, pricing, budget, the
routing log, metrics, the x-localroute-* headers). serve_chat is called on a request that carries
the translated body, and its JSON answer or SSE chunks are read back as dicts.

ADAPTER (until issue 16's serving entry point lands): main's chat path reads only text messages and
the sampling fields, and would quietly drop the rest, so `refuse_what_the_chat_path_drops` turns
tools, tool turns, images, files and the other fields it does not carry into a 400 naming them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from localroute.errors import InvalidRequestError
from localroute.server.http import dumps
from localroute.server.serving import serve_chat

__all__ = ["ChatAnswer", "ChatStream", "refuse_what_the_chat_path_drops", "serve_chat_body"]

# what main's chat path carries to a tier (server/protocol.py chat_request, backends' _body)
_CARRIED = frozenset({"model", "messages", "max_completion_tokens", "stop", "temperature", "top_p", "stream",
                      "stream_options", "logprobs", "top_logprobs", "response_format"})


@dataclass
class ChatAnswer:
    answer: dict[str, Any]
    headers: dict[str, str]
    background: BackgroundTask | None  # the request's record, for the observers once the answer is sent


@dataclass
class ChatStream:
    chunks: AsyncGenerator[dict[str, Any], None]
    headers: dict[str, str] = field(default_factory=dict)


def _not_carried(param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: not carried by this server's chat path yet; remove it",
                               param=param, code="unsupported_field")


def refuse_what_the_chat_path_drops(chat: Mapping[str, Any]) -> None:
    for key in chat:
        if key not in _CARRIED:
            raise _not_carried(key)
    if set(chat.get("stream_options") or {}) - {"include_usage"}:
        raise _not_carried("stream_options")
    for i, m in enumerate(chat["messages"]):
        if m["role"] == "tool" or m.get("tool_calls"):
            raise _not_carried(f"messages.{i}" + (".tool_calls" if m.get("tool_calls") else ""))
        if set(m) - {"role", "content"}:
            raise _not_carried(f"messages.{i}.{min(set(m) - {'role', 'content'})}")
        for j, part in enumerate(m["content"] if isinstance(m["content"], list) else ()):
            if part.get("type") != "text" or set(part) != {"type", "text"}:
                extra = sorted(set(part) - {"type", "text"})
                raise _not_carried(f"messages.{i}.content.{j}" + (f".{extra[0]}" if part.get("type") == "text" else ""))


def _with_body(request: Request, raw: bytes) -> Request:
    """The same request (scope, state, headers, disconnect watch) carrying `raw` as its body."""
    sent = False

    async def receive() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)


def _routing_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("x-localroute-")}


async def serve_chat_body(request: Request, chat: dict[str, Any]) -> ChatAnswer | ChatStream:
    """Route `chat` as /v1/chat/completions would; errors before the answer are raised (LocalrouteError)."""
    refuse_what_the_chat_path_drops(chat)
    response = await serve_chat(_with_body(request, dumps(chat)))
    headers = _routing_headers(response.headers)
    if not isinstance(response, StreamingResponse):
        return ChatAnswer(orjson.loads(response.body), headers, response.background)
    return ChatStream(_chunks(response), headers)


async def _chunks(response: StreamingResponse) -> AsyncGenerator[dict[str, Any], None]:
    """The chat SSE stream's data events as dicts, until [DONE]; closing this closes the stream
    (its record is written then)."""
    source = response.body_iterator
    try:
        async for raw in source:
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            for line in data.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    return
                yield orjson.loads(payload)
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
