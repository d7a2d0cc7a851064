"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: the Messages body validated
(protocol.py), translated to a chat body (translate.py), routed through the chat path
(serving.chat_completion: the same validation, policies, capability routing, pricing, budget,
routing log, metrics and x-localroute-* headers), and the answer or its stream translated back.
The routing block rides in the answer's `localroute` field (in `message_delta` when streamed).
Errors are Anthropic-shaped (server/errors.py).

A tier speaking Messages (kind="anthropic") gets the body as the client sent it (model replaced)
and its answer, or its stream event for event, comes back as it sent it: localroute sets only
the message id, the model and the routing block; the client's `anthropic-version` and
`anthropic-beta` headers go to it as sent (a beta feature asked for is one it serves; a chat tier
gets the translated body and no such headers). Thinking, citations and a final assistant message
(prefill), which chat cannot carry, are capability needs (backends/capabilities.py) such a tier
has: routing skips the tiers that lack them, and only when none is left is it a 400
`unsupported_capability` naming the need.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from localroute.backends.openai_wire import NATIVE_ANSWER, NATIVE_EVENTS
from localroute.errors import InvalidRequestError, LocalrouteError
from localroute.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from localroute.server.anthropic.translate import MessagesStream, message_from_chat, message_id, to_chat
from localroute.server.errors import anthropic_error_body
from localroute.server.http import until_disconnect, validate
from localroute.server.protocol import chat_request
from localroute.server.schemas import ChatCompletionRequest
from localroute.server.serving import ChatAnswer, chat_completion, service_of
from localroute.server.translate import answer_failed, read_body, rejected, sse_event
from localroute.types import WireRequest

__all__ = ["FORWARDED_HEADERS", "forwarded_headers", "serve_count_tokens", "serve_messages"]

ENDPOINT = "messages"
FORWARDED_HEADERS = frozenset({"anthropic-version", "anthropic-beta"})


async def _accept(request: Request,
                  model: type[CountTokensRequest]) -> tuple[dict[str, Any], dict[str, Any], frozenset[str]]:
    """The body, its chat translation, and the Messages-only features it asks for (capability
    needs only a tier speaking Messages has: it gets the body as sent)."""
    svc = service_of(request)
    started = time.perf_counter()
    try:
        body = await read_body(request, model, svc.settings.max_json_depth)
        needs: set[str] = set()
        chat = to_chat(body, needs)
        return body, chat, frozenset(needs)
    except LocalrouteError as exc:
        rejected(svc, ENDPOINT, exc, started)
        raise


async def serve_messages(request: Request) -> Response:
    body, chat, needs = await _accept(request, MessagesRequest)
    wire = WireRequest("messages", body, forwarded_headers(request))
    routed = await chat_completion(request, chat, ENDPOINT, wire, needs)
    if isinstance(routed, ChatAnswer):
        try:
            message = message_from_chat(routed.payload, body["model"], _native(routed))
        except BaseException as exc:
            answer_failed(routed, exc)
            raise
        return routed.response(message)
    chunks = routed.chunks.__aiter__()
    first: dict[str, Any] = await anext(chunks, {"choices": []})  # routed before the first byte: ids are known
    # a tier speaking Messages answered: its own events go out as sent (the chunks carry them), or
    # its buffered answer (a non-final tier's call) as events, every content block kept
    stream = MessagesStream(message_id(str(first.get("id", ""))), body["model"],
                            native=NATIVE_EVENTS in first or NATIVE_ANSWER in first)

    async def events() -> AsyncIterator[bytes]:
        try:
            for event in stream.start() + stream.feed(first):
                yield sse_event(*event)
            async for chunk in chunks:
                for event in stream.feed(chunk):
                    yield sse_event(*event)
            for event in stream.finish():
                yield sse_event(*event)
        except LocalrouteError as exc:  # bytes already sent: an error event ends the stream
            yield sse_event("error", anthropic_error_body(exc.status_code, exc.message))
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**routed.headers, "Cache-Control": "no-cache"})


def forwarded_headers(request: Request) -> tuple[tuple[str, str], ...]:
    """The client's `anthropic-version` and `anthropic-beta` headers, every line as sent, in
    order: a tier speaking Messages gets them (a beta feature asked for is one the tier serves)."""
    return tuple((name, value) for name, value in request.headers.items() if name in FORWARDED_HEADERS)


def _native(routed: ChatAnswer) -> dict[str, Any] | None:
    """The Messages answer as a tier speaking Messages sent it, when one answered."""
    gen = routed.record.generation
    native = gen.extra.get("native") if gen is not None else None
    return native if isinstance(native, dict) and native.get("type") == "message" else None


async def serve_count_tokens(request: Request) -> Response:
    """The prompt's token count by the route's first local tier that can read the request (its
    tokenizer and chat template, through one 1-token generation that is neither routed nor logged);
    a 400 when the route has none (a remote tier is never called, or paid, to count)."""
    body, chat, needs = await _accept(request, CountTokensRequest)
    svc = service_of(request)
    try:
        gen_request = chat_request(validate(chat, ChatCompletionRequest), chat, svc.settings, "count_tokens")
        gen_request = replace(gen_request, needs=gen_request.needs | needs)
        router: Any = svc.router(body["model"])
        local = next((t for t in getattr(router, "tiers", svc.tiers)
                      if t.backend.is_local and t.lacks(gen_request.needs) is None), None)
        if local is None:
            raise InvalidRequestError(f"count_tokens needs a local tier on {body['model']!r}'s route that reads "
                                      "this request, to tokenize with", param="model", code="no_local_tier")
    except LocalrouteError as exc:
        rejected(svc, ENDPOINT, exc, time.perf_counter())
        raise
    one = replace(gen_request, params=replace(gen_request.params, max_tokens=1))
    generation = await until_disconnect(request, local.backend.generate(one))
    return JSONResponse({"input_tokens": generation.prompt_tokens})
