"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: the Messages body validated
(protocol.py), translated to a chat body (translate.py), routed through the chat path
(server/chat_bridge.py: same policies, pricing, budget, routing log, metrics and x-localroute-*
headers), and the answer or its stream translated back. The routing block rides in the answer's
`localroute` field (in `message_delta` when streamed). Errors are Anthropic-shaped (server/errors.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from localroute.errors import InvalidRequestError, LocalrouteError
from localroute.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from localroute.server.anthropic.translate import MessagesStream, message_from_chat, message_id, to_chat
from localroute.server.chat_bridge import ChatAnswer, refuse_what_the_chat_path_drops, serve_chat_body
from localroute.server.errors import anthropic_error_body
from localroute.server.http import AnswerResponse
from localroute.server.protocol import chat_request
from localroute.server.schemas import ChatCompletionRequest
from localroute.server.serving import service_of
from localroute.server.translate import read_body, rejected, sse_event

__all__ = ["serve_count_tokens", "serve_messages"]

ENDPOINT = "messages"


async def _accept(request: Request, model: type[CountTokensRequest]) -> tuple[dict[str, Any], dict[str, Any]]:
    svc = service_of(request)
    started = time.perf_counter()
    try:
        body = await read_body(request, model, svc.settings.max_json_depth)
        return body, to_chat(body)
    except LocalrouteError as exc:
        rejected(svc, ENDPOINT, exc, started)
        raise


async def serve_messages(request: Request) -> Response:
    body, chat = await _accept(request, MessagesRequest)
    routed = await serve_chat_body(request, chat)
    if isinstance(routed, ChatAnswer):
        try:
            message = message_from_chat(routed.answer, body["model"])
        except BaseException:
            if routed.background is not None:
                await routed.background()  # the request was served: its record is still written
            raise
        return AnswerResponse(message, headers=routed.headers, background=routed.background)
    chunks = routed.chunks
    first = await chunks.__anext__()  # routed before the first byte: ids are known
    stream = MessagesStream(message_id(str(first.get("id", ""))), body["model"])

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
            await chunks.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**routed.headers, "Cache-Control": "no-cache"})


async def serve_count_tokens(request: Request) -> Response:
    """The prompt's token count by the router's first local tier (its tokenizer and chat template,
    through one 1-token generation); a 400 when the model's route has no local tier."""
    body, chat = await _accept(request, CountTokensRequest)
    svc = service_of(request)
    router: Any = svc.router(body["model"])
    local = next((t for t in getattr(router, "tiers", svc.tiers) if t.backend.is_local), None)
    if local is None:
        raise InvalidRequestError(f"count_tokens needs a local tier on {body['model']!r}'s route to tokenize with",
                                  param="model", code="no_local_tier")
    refuse_what_the_chat_path_drops(chat)
    gen_request = chat_request(ChatCompletionRequest.model_validate({**chat, "max_completion_tokens": 1}),
                               svc.settings, "count_tokens")
    generation = await local.backend.generate(gen_request)
    return JSONResponse({"input_tokens": generation.prompt_tokens})
