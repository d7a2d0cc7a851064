"""`POST /v1/responses` and `GET /v1/responses/{id}`: the Responses body validated (protocol.py),
translated to a chat body (translate_request.py), routed through the chat path (serving.chat_completion:
the same validation, policies, capability routing, pricing, budget, routing log, metrics and
x-localroute-* headers), and the answer or its stream translated back. The routing block rides in the Response's `localroute` field.

`store` and `previous_response_id` use the routing log's database (monitoring/response_store.py;
with PostgreSQL, shared by every replica): without a routing log, `previous_response_id` and an
explicit `store: true` are a 400, and answers say `"store": false`. Responses are stored unless the
client sends `store: false`.

A tier speaking the Responses API (kind="openai" with `responses_api = true`) gets the client's
body as sent (translate_request.native_body: model replaced, localroute's metadata keys removed) and its
Response, or its events, come back as it sent them, with localroute's id, model and routing block.
Conversation state stays localroute's whichever tier answers (a later turn may go to another):
the tier is sent `store: false`, and a `previous_response_id` is resolved here, its stored turns
sent as input items in front of the client's own. The passthrough Response is what is stored, and
its conversation keeps every item as sent (input and output: reasoning, hosted tools' items), so a
later turn to a Responses tier sends them all back; a chat tier reads what chat carries of them.
An `item_reference` input item is resolved here too, against the store (`_resolve_references`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from localroute.backends.openai_wire import NATIVE_ANSWER, NATIVE_EVENTS
from localroute.errors import InvalidRequestError, LocalrouteError, NotFoundError
from localroute.monitoring.response_store import STORE_ERROR_HEADER, ResponseStore
from localroute.server.errors import error_body
from localroute.server.responses.protocol import ResponsesRequest, is_item_reference
from localroute.server.responses.translate_answer import (
    NativeResponsesStream,
    ResponsesStream,
    passed_through,
    response_from_chat,
)
from localroute.server.responses.translate_request import conversation_items, native_body, to_chat
from localroute.server.serving import ChatAnswer, chat_completion, service_of
from localroute.server.translate import answer_failed, read_body, rejected, sse_event
from localroute.service import Service
from localroute.types import WireRequest

__all__ = ["get_response", "serve_responses"]

ENDPOINT = "responses"


def _store(svc: Service) -> ResponseStore | None:
    store: ResponseStore | None = svc.responses  # built with the routing log (server/app.py)
    return store


def _response_id(chat_id: str) -> str:
    return "resp_" + chat_id.split("-", 1)[-1]


async def _accept(request: Request, svc: Service) -> tuple[dict[str, Any], dict[str, Any], ResponseStore | None,
                                                           list[dict[str, Any]], frozenset[str]]:
    """The body, its chat translation, the store, the stored turns it continues, and whether it
    asks for what only a Responses tier serves (the need "responses_api")."""
    started = time.perf_counter()
    try:
        body = await read_body(request, ResponsesRequest, svc.settings.max_json_depth)
        store = _store(svc)
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if store is None:
                raise InvalidRequestError("previous_response_id needs the response store: set routing_log_path "
                                          "or routing_log_url",
                                          param="previous_response_id", code="store_disabled")
            found = await asyncio.to_thread(store.get, previous)
            if found is None:
                raise InvalidRequestError(f"Previous response with id {previous!r} not found.",
                                          param="previous_response_id", code="previous_response_not_found")
            history = found[1]
        if body.get("store") is True and store is None:
            raise InvalidRequestError("store: true needs the response store: set routing_log_path or "
                                      "routing_log_url",
                                      param="store", code="store_disabled")
        if not isinstance(body["input"], str) and any(is_item_reference(item) for item in body["input"]):
            body = {**body, "input": await _resolve_references(body["input"], store, history)}
        needs: set[str] = set()
        chat = to_chat(body, history, needs)
        return body, chat, store, history, frozenset(needs)
    except LocalrouteError as exc:
        rejected(svc, ENDPOINT, exc, started)
        raise


async def _resolve_references(items: list[dict[str, Any]], store: ResponseStore | None,
                              history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items with each `item_reference` replaced by the stored item it names, as stored:
    found in the conversation `previous_response_id` names, else in the stored Response whose
    id an item id localroute issued derives from (msg_<x>, fc_<x>_<i>: resp_<x>). A 400 naming
    the id when it is not found, or when there is no store."""
    out = []
    for i, item in enumerate(items):
        if not is_item_reference(item):
            out.append(item)
            continue
        item_id = str(item["id"])
        if store is None:
            raise InvalidRequestError(f"item_reference {item_id!r} needs the response store: set routing_log_path or "
                                      "routing_log_url", param=f"input.{i}.id", code="store_disabled")
        found = _find_item(history, item_id)
        for response_id in _issuers(item_id):
            stored = await asyncio.to_thread(store.get, response_id) if found is None else None
            if stored is not None:
                found = _find_item([*stored[1], *(stored[0].get("output") or ())], item_id)
        if found is None:
            raise InvalidRequestError(f"Item with id {item_id!r} not found.", param=f"input.{i}.id",
                                      code="item_not_found")
        out.append(found)
    return out


def _issuers(item_id: str) -> list[str]:
    """The ids of the stored Responses an item id localroute issued can come from (translate_answer:
    message_item_id, call_item_id)."""
    suffix = item_id.partition("_")[2]
    return [f"resp_{s}" for s in dict.fromkeys((suffix, suffix.rpartition("_")[0])) if s]


def _find_item(items: list[dict[str, Any]], item_id: str) -> dict[str, Any] | None:
    return next((dict(item) for item in items if item.get("id") == item_id and "type" in item), None)


async def serve_responses(request: Request) -> Response:
    svc = service_of(request)
    body, chat, store, history, needs = await _accept(request, svc)
    keep = store if body.get("store") is not False else None
    echo = {**body, "store": keep is not None}
    routed = await chat_completion(request, chat, ENDPOINT, WireRequest("responses", native_body(body, history)),
                                   needs)
    created_at = time.time()
    if isinstance(routed, ChatAnswer):
        try:
            response_id = _response_id(str(routed.payload.get("id", "")))
            native = _native(routed)
            if native is not None:
                response = passed_through(native, echo, response_id, routed.payload.get("localroute"))
            else:
                response = response_from_chat(routed.payload, echo, response_id, created_at)
            if keep is not None:
                try:
                    await asyncio.to_thread(keep.put, response_id, response,
                                            conversation_items(history, body, response["output"]))
                except Exception as exc:  # noqa: BLE001 - computed and paid for: returned, not claimed stored
                    response = {**response, "store": False}
                    routed.headers[STORE_ERROR_HEADER] = keep.failed(response_id, exc)
        except BaseException as exc:
            answer_failed(routed, exc)
            raise
        return routed.response(response)
    chunks = routed.chunks.__aiter__()
    first: dict[str, Any] = await anext(chunks, {"choices": []})  # routed before the first byte: ids are known
    chat_id = str(first.get("id", ""))
    # a tier speaking the Responses API answered: its own events go out as sent (the chunks carry
    # them), or its buffered Response (a non-final tier's call) as events, every output item kept
    kind = NativeResponsesStream if NATIVE_EVENTS in first or NATIVE_ANSWER in first else ResponsesStream
    stream = kind(echo, _response_id(chat_id), created_at, chat_id)

    async def events() -> AsyncIterator[bytes]:
        try:
            for event in stream.start() + stream.feed(first):
                yield sse_event(*event)
            async for chunk in chunks:
                for event in stream.feed(chunk):
                    yield sse_event(*event)
            for event in stream.finish():
                yield sse_event(*event)
            if keep is not None and stream.response is not None:
                try:
                    await asyncio.to_thread(keep.put, stream.response_id, stream.response,
                                            conversation_items(history, body, stream.response["output"]))
                except Exception as exc:  # noqa: BLE001 - any database's failure: an event says so
                    reason = keep.failed(stream.response_id, exc)
                    for event in stream.not_stored(f"response {stream.response_id} was answered but not stored "
                                                   f"({reason}): it cannot be retrieved or continued"):
                        yield sse_event(*event)
        except LocalrouteError as exc:  # bytes already sent: an error event ends the stream
            for event in stream.feed({"error": error_body(exc.message, exc.error_type, exc.param, exc.code)["error"]}):
                yield sse_event(*event)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**routed.headers, "Cache-Control": "no-cache"})


def _native(routed: ChatAnswer) -> dict[str, Any] | None:
    """The Response as a tier speaking the Responses API sent it, when one answered."""
    gen = routed.record.generation
    native = gen.extra.get("native") if gen is not None else None
    return native if isinstance(native, dict) and native.get("object") == "response" else None


async def get_response(request: Request, response_id: str) -> Response:
    store = _store(service_of(request))
    found = await asyncio.to_thread(store.get, response_id) if store is not None else None
    if found is None:
        raise NotFoundError(f"No response found with id {response_id!r}.", param="response_id")
    return JSONResponse(found[0])
