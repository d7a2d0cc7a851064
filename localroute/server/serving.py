"""Chat Completions and Completions served: wire request -> internal request -> router -> wire
answer (vLLM's `serving_*.py`). Routing is the router's; what is OpenAI-shaped is protocol.py's.

Every request ends in exactly one `RequestRecord` for the observers: refused before routing, failed
while routing, answered (after the answer is sent), or streamed (when the stream ends, however).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from localroute.errors import ClientDisconnectedError, LocalrouteError
from localroute.monitoring.cost import RequestCost, cost_fields, cost_headers
from localroute.monitoring.record import RequestRecord
from localroute.routing.base import Routed, RoutedDelta, Router
from localroute.server.errors import error_body
from localroute.server.http import AnswerResponse, dumps, parse_body, until_disconnect
from localroute.server.protocol import (
    chat_logprobs,
    chat_request,
    completion_logprobs,
    completion_request,
    routing_headers,
    routing_info,
    usage,
)
from localroute.server.schemas import ChatCompletionRequest, CompletionRequest
from localroute.service import Service
from localroute.settings import Settings
from localroute.types import Generation, GenerationRequest

__all__ = ["serve_chat", "serve_completion"]

Build = Callable[[Any, Settings, str], GenerationRequest]


def service_of(request: Request) -> Service:
    return cast(Service, request.app.state.service)


async def serve_chat(request: Request) -> Response:
    svc, body, router, gen_request, started = await _accept(request, ChatCompletionRequest, chat_request,
                                                            "chat", "chatcmpl")
    k = gen_request.params.top_logprobs
    if body.stream:
        return await _stream(svc, router, gen_request, "chat", bool(body.logprobs), k,
                             bool(body.stream_options and body.stream_options.include_usage), body.model, request)
    routed, cost, record = await _route(svc, router, gen_request, "chat", started, request)
    return _answer(svc, request, routed, cost, record, "chat.completion", body.model, lambda gen: {
        "message": {"role": "assistant", "content": gen.text},
        "logprobs": chat_logprobs(gen.tokens, k) if body.logprobs else None,
    })


async def serve_completion(request: Request) -> Response:
    svc, body, router, gen_request, started = await _accept(request, CompletionRequest, completion_request,
                                                            "completion", "cmpl")
    k = gen_request.params.top_logprobs
    want_lp = body.logprobs is not None
    if body.stream:
        return await _stream(svc, router, gen_request, "completion", want_lp, k,
                             bool(body.stream_options and body.stream_options.include_usage), body.model, request)
    routed, cost, record = await _route(svc, router, gen_request, "completion", started, request)
    return _answer(svc, request, routed, cost, record, "text_completion", body.model, lambda gen: {
        "text": gen.text,
        "logprobs": completion_logprobs(gen.tokens, k) if want_lp else None,
    })


async def _accept(request: Request, model: Any, build: Build, endpoint: str,
                  id_prefix: str) -> tuple[Service, Any, Router, GenerationRequest, float]:
    """Parse the body, pick the router, build the engine request; a refusal is logged, then raised."""
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    svc = service_of(request)
    started = time.perf_counter()
    try:
        body = await parse_body(request, model, svc.settings.max_json_depth)
        router = svc.router(body.model)
        return svc, body, router, build(body, svc.settings, request_id), started
    except LocalrouteError as exc:
        _rejected(svc, request_id, endpoint, exc, started)
        raise


def _rejected(svc: Service, request_id: str, endpoint: str, exc: LocalrouteError, started: float) -> None:
    """A request refused before routing (bad body, unknown model) still gets its log row and
    metrics; its policy label is fixed, so clients cannot grow the metrics' label set."""
    svc.record(RequestRecord(request_id, endpoint, "rejected", False, exc.status_code, started,
                             time.perf_counter() - started, error=exc.code or exc.error_type))


def _failed(req: GenerationRequest, endpoint: str, policy: str, stream: bool, exc: LocalrouteError,
            started: float) -> RequestRecord:
    return RequestRecord(req.request_id, endpoint, policy, stream, exc.status_code, started,
                         time.perf_counter() - started, error=exc.code or exc.error_type,
                         disconnected=isinstance(exc, ClientDisconnectedError))


async def _route(svc: Service, router: Router, req: GenerationRequest, endpoint: str,
                 started: float, request: Request) -> tuple[Routed, RequestCost | None, RequestRecord]:
    try:
        routed: Routed = await until_disconnect(request, router.route(req))
    except LocalrouteError as exc:
        svc.record(_failed(req, endpoint, router.policy, False, exc, started))
        raise
    cost = svc.monitoring.price(routed.decision, routed.generation, started) if svc.monitoring else None
    record = RequestRecord(req.request_id, endpoint, router.policy, False, 200, started,
                           time.perf_counter() - started, routed.generation.ttft_s, routed.decision,
                           routed.generation, extra={"cost": cost, "request": req})
    return routed, cost, record  # recorded by _answer


def _answer(svc: Service, request: Request, routed: Routed, cost: RequestCost | None, record: RequestRecord,
            obj: str, model: str, choice: Callable[[Generation], dict[str, Any]]) -> Response:
    """A non-streamed answer. Its record goes to the observers once the answer has been sent (a
    background task: the client never waits for metrics or the routing log), or at once, as a
    500, if building the answer fails: a request the engines served is never left unrecorded."""
    gen, decision = routed.generation, routed.decision
    request.state.engine_s = sum(a.latency_s for a in decision.attempts)
    try:
        payload = {
            "id": record.request_id,
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, **choice(gen), "finish_reason": gen.finish_reason}],
            "usage": usage(gen),
            "localroute": routing_info(decision, cost_fields(cost)),
        }
        return AnswerResponse(payload, headers={**routing_headers(decision), **cost_headers(cost)},
                              background=BackgroundTask(svc.record_async, record))
    except Exception:
        record.status_code, record.error = 500, "internal_error"
        svc.record(record)
        raise


async def _stream(svc: Service, router: Router, req: GenerationRequest, kind: str, want_lp: bool,
                  k: int, include_usage: bool, model: str, request: Request) -> Response:
    started = time.perf_counter()
    source = cast(AsyncGenerator[RoutedDelta, None], router.route_stream(req).__aiter__())
    try:  # route before the first byte: errors are still clean 4xx/5xx
        first = await until_disconnect(request, source.__anext__())
    except LocalrouteError as exc:
        await source.aclose()
        svc.record(_failed(req, kind, router.policy, True, exc, started))
        raise
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    head = (b'data: {"id":' + dumps(req.request_id) + b',"object":"' + obj.encode() + b'","created":'
            + str(created).encode() + b',"model":' + dumps(model) + b',"choices":')

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        """One SSE event, encoded once: the fixed head, then the choices and any extra fields."""
        tail = b"".join(b',"' + key.encode() + b'":' + dumps(value) for key, value in extra.items())
        return head + dumps(choices) + tail + b"}\n\n"

    def piece(item: RoutedDelta) -> bytes | None:
        d = item.delta
        if not d.text and d.token is None:
            return None
        tokens = [d.token] if d.token is not None else []
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {"content": d.text}, "finish_reason": None,
                                      "logprobs": chat_logprobs(tokens, k) if want_lp else None}
        else:
            choice = {"index": 0, "text": d.text, "finish_reason": None,
                      "logprobs": completion_logprobs(tokens, k) if want_lp else None}
        return chunk([choice])

    async def events() -> AsyncIterator[bytes]:
        ttft: float | None = None
        outcome = RequestRecord(req.request_id, kind, router.policy, True, 200, started, 0.0)
        try:
            if kind == "chat":
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}])
            item: RoutedDelta | None = first
            while item is not None:
                if item.routed is not None:
                    gen, decision = item.routed.generation, item.routed.decision
                    done: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
                    if kind == "chat":
                        done["delta"] = {}
                    else:
                        done["text"] = ""
                    cost = svc.monitoring.price(decision, gen, started) if svc.monitoring else None
                    outcome.extra.update(cost=cost, request=req)
                    yield chunk([done], localroute=routing_info(decision, cost_fields(cost)))
                    if include_usage:
                        yield chunk([], usage=usage(gen))
                    yield b"data: [DONE]\n\n"
                    outcome.decision, outcome.generation = decision, gen
                    break
                data = piece(item)
                if data is not None:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    yield data
                item = await source.__anext__()
        except LocalrouteError as exc:  # bytes already sent: end with an error event, no [DONE]
            outcome.status_code, outcome.error = exc.status_code, exc.code or exc.error_type
            yield f"data: {json.dumps(error_body(exc.message, exc.error_type, exc.param, exc.code))}\n\n".encode()
        except BaseException:
            outcome.disconnected, outcome.status_code, outcome.error = True, 499, "client_disconnected"
            raise
        finally:
            await source.aclose()
            outcome.latency_s = time.perf_counter() - started
            outcome.ttft_s = ttft
            svc.record(outcome)

    headers = routing_headers(first.decision, final=first.routed is not None)
    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
