"""Chat Completions and Completions served: wire request -> internal request -> router -> wire
answer (vLLM's `serving_*.py`). Routing is the router's; what is OpenAI-shaped is protocol.py's.

The entry point other APIs build on is `chat_completion(request, body)`: a Chat Completions body
as a dict (the client's own, or one translated from the Responses or Messages API) in, the routed
answer out, either a `ChatAnswer` (the chat.completion JSON, its headers, its record) or a
`ChatStream` (chat.completion.chunk dicts and the headers to send before them). The caller turns
either into its own wire format; `serve_chat` is the plain OpenAI one.

A remote tier's answer is passed through as the provider sent it (tool calls, refusals, every
choice and delta kind); localroute sets only `id` (its own request id, which the feedback API
and the routing log know), `model` (the id the client asked for) and `usage.cost`, and adds its
`localroute` routing block (in a stream: on the last chunk).

Every request ends in exactly one `RequestRecord` for the observers: refused before routing, failed
while routing, answered (after the answer is sent), or streamed (when the stream ends, however).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from localroute.backends.labels import labels_from_metadata
from localroute.backends.openai_wire import NATIVE_ANSWER, NATIVE_EVENTS
from localroute.errors import ClientDisconnectedError, LocalrouteError
from localroute.monitoring.cost import RequestCost, cost_fields, cost_headers
from localroute.monitoring.record import RequestRecord
from localroute.routing.base import Decision, Routed, RoutedDelta, Router
from localroute.routing.categories import (
    ResolvedCategory,
    resolve_category,
    split_model_alias,
    strip_category,
)
from localroute.server.errors import error_body
from localroute.server.http import AnswerResponse, dumps, parse_json_body, until_disconnect, validate
from localroute.server.protocol import (
    chat_logprobs,
    chat_request,
    completion_logprobs,
    completion_request,
    routing_headers,
    routing_info,
    usage,
    usage_with_cost,
)
from localroute.server.schemas import ChatCompletionRequest, CompletionRequest
from localroute.service import Service
from localroute.types import Generation, GenerationRequest, WireRequest

__all__ = ["ChatAnswer", "ChatStream", "chat_completion", "read_json", "serve_chat", "serve_completion",
           "service_of", "sse_response"]

Api = Literal["chat", "completions"]
Chunk = dict[str, Any]


def service_of(request: Request) -> Service:
    return cast(Service, request.app.state.service)


@dataclass(slots=True)
class ChatAnswer:
    """A routed, non-streamed answer. `payload`: the chat.completion (or text_completion) JSON a
    Chat Completions client gets; `headers`: the x-localroute-* routing and cost headers;
    `record`: handed to the observers once the answer is sent (`response` does that)."""

    payload: dict[str, Any]
    headers: dict[str, str]
    record: RequestRecord
    service: Service

    def response(self, content: Any = None) -> Response:
        """The answer as JSON (`content`: a translation of `payload` for another API), its record
        sent to the observers after the body (the client never waits for the routing log)."""
        return AnswerResponse(self.payload if content is None else content, headers=self.headers,
                              background=BackgroundTask(self.service.record_async, self.record))

    def failed(self) -> None:
        """Building the client's answer failed (a translation bug): record the request as a 500."""
        self.record.status_code, self.record.error = 500, "internal_error"
        self.service.record(self.record)


@dataclass(slots=True)
class ChatStream:
    """A routed stream: `chunks` yields chat.completion.chunk dicts (text_completion for the
    Completions API); the last one carries the `localroute` block (and `usage` when the client
    asked for it). An error after the first chunk is raised from `chunks` as a LocalrouteError
    (the caller ends its stream with an error event); the record is sent when `chunks` ends."""

    chunks: AsyncIterator[Chunk]
    headers: dict[str, str]


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (400 for bad JSON, 499 for a client that left mid-body)."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientDisconnectedError("client disconnected") from None
    return parse_json_body(raw, service_of(request).settings.max_json_depth)


async def serve_chat(request: Request) -> Response:
    return await _respond(request, "chat")


async def serve_completion(request: Request) -> Response:
    return await _respond(request, "completions")


async def _respond(request: Request, api: Api) -> Response:
    started = time.perf_counter()
    try:
        data = await read_json(request)
    except LocalrouteError as exc:
        _rejected(service_of(request), _request_id(api), _endpoint(api), exc, started)
        raise
    result = await _serve(request, data, api, _endpoint(api), started)
    if isinstance(result, ChatStream):
        return sse_response(result)
    return result.response()


async def chat_completion(request: Request, body: dict[str, Any], endpoint: str = "chat",
                          native: WireRequest | None = None,
                          needs: frozenset[str] = frozenset()) -> ChatAnswer | ChatStream:
    """Route a Chat Completions body (a dict, as parsed from JSON): validated as the chat endpoint
    validates it (400 naming the field), routed, answered. `endpoint` labels the request in the
    metrics and the routing log (e.g. "responses", "messages"); `native`: the client's own body,
    for a tier that speaks its API (GenerationRequest.native); `needs`: what serving the native
    body takes beyond what the chat body says (e.g. Messages' "thinking")."""
    return await _serve(request, body, "chat", endpoint, time.perf_counter(), native, needs)


def sse_response(stream: ChatStream) -> StreamingResponse:
    """OpenAI's server-sent events: `data: {chunk}` per chunk, `data: [DONE]` at the end; an error
    after the first byte is one `data: {"error": ...}` event and no [DONE]."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream.chunks:
                yield b"data: " + dumps(chunk) + b"\n\n"
        except LocalrouteError as exc:
            yield b"data: " + dumps(error_body(exc.message, exc.error_type, exc.param, exc.code)) + b"\n\n"
            return
        yield b"data: [DONE]\n\n"

    headers = {**stream.headers, "Cache-Control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _request_id(api: Api) -> str:
    return f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def _endpoint(api: Api) -> str:
    return "chat" if api == "chat" else "completion"


async def _serve(request: Request, data: dict[str, Any], api: Api, endpoint: str,
                 started: float, native: WireRequest | None = None,
                 needs: frozenset[str] = frozenset()) -> ChatAnswer | ChatStream:
    request_id = _request_id(api)
    svc = service_of(request)
    try:
        policy, alias = split_model_alias(str(data.get("model", "")), svc.routers)
        category = resolve_category(svc.settings, data, request.headers, alias)
        labels = labels_from_metadata(data.get("metadata"))  # localroute's own key: read before it is stripped
        data = strip_category(data)
        if alias is not None:
            data = {**data, "model": policy}
        if api == "chat":
            chat = validate(data, ChatCompletionRequest)
            body: ChatCompletionRequest | CompletionRequest = chat
            req = chat_request(chat, data, svc.settings, request_id, labels)
            if native is not None:
                req = replace(req, native=native, needs=req.needs | needs)
        else:
            completion = validate(data, CompletionRequest)
            body = completion
            req = completion_request(completion, data, svc.settings, request_id)
        router = svc.router(body.model)
    except LocalrouteError as exc:
        _rejected(svc, request_id, endpoint, exc, started)
        raise
    if category.source == "default" and svc.category_neighbours is not None:
        category = await svc.category_neighbours.resolve(req, category)
    req = replace(req, category=category.name)
    model_named = policy if alias is None else f"{policy}:{alias}"  # answers name the model as asked
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shape = _Shape(api, model_named, bool(body.logprobs) if api == "chat" else body.logprobs is not None,
                   req.params.top_logprobs, include_usage)
    if body.stream:
        return await _stream(svc, router, req, endpoint, shape, request, started, category)
    routed, cost, record = await _route(svc, router, req, endpoint, started, request)
    _label(routed.decision, category)
    request.state.engine_s = sum(a.latency_s for a in routed.decision.attempts)
    try:
        payload = shape.answer(record.request_id, routed, cost)
    except Exception:
        record.status_code, record.error = 500, "internal_error"
        svc.record(record)
        raise
    headers = {**routing_headers(routed.decision), **cost_headers(cost), "x-localroute-category": category.name}
    return ChatAnswer(payload, headers, record, svc)


def _label(decision: Decision, category: ResolvedCategory) -> None:
    """The category in the decision's evidence: the answer's `localroute` block and the routing log."""
    decision.evidence["category"] = category.name
    decision.evidence["category_source"] = category.source
    decision.evidence.update(category.evidence)


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
    return routed, cost, record  # recorded once the answer is sent


def _info(decision: Decision, cost: RequestCost | None, gen: Generation) -> dict[str, Any]:
    info = routing_info(decision, cost_fields(cost))
    upstream_cost = (gen.extra.get("usage") or {}).get("cost") if gen.raw is not None else None
    if upstream_cost is not None:
        info["upstream_cost"] = upstream_cost
    return info


@dataclass(frozen=True, slots=True)
class _Shape:
    """How answers to one request are written: its API, the model id it named, logprobs asked."""

    api: Api
    model: str
    want_logprobs: bool
    top_logprobs: int
    include_usage: bool

    @property
    def chat(self) -> bool:
        return self.api == "chat"

    def answer(self, request_id: str, routed: Routed, cost: RequestCost | None) -> dict[str, Any]:
        gen, decision = routed.generation, routed.decision
        cost_usd = cost.cost_usd if cost is not None else None
        if self.chat and gen.raw is not None:  # a remote tier's answer, as the provider sent it
            out = {**gen.raw, "id": request_id, "model": self.model, "localroute": _info(decision, cost, gen)}
            out["usage"] = usage_with_cost(gen.raw.get("usage") or usage(gen), cost_usd)
            if self.want_logprobs:
                out["choices"] = self.call_logprobs(out.get("choices") or [], gen)
            return out
        choices = []
        for index, g in enumerate((gen, *gen.choices)):  # n > 1: a local answer's other choices
            if self.chat:
                choice: dict[str, Any] = {
                    "index": index, "message": {"role": "assistant", "content": g.text},
                    "logprobs": chat_logprobs(g.tokens, self.top_logprobs) if self.want_logprobs else None,
                }
            else:
                choice = {"index": index, "text": g.text,
                          "logprobs": completion_logprobs(g.tokens, self.top_logprobs) if self.want_logprobs else None}
            choices.append({**choice, "finish_reason": g.finish_reason})
        return {
            "id": request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": usage_with_cost(usage(gen), cost_usd),
            "localroute": _info(decision, cost, gen),
        }


    def call_logprobs(self, choices: list[Any], gen: Generation) -> list[Any]:
        """A local tool-call answer's choices with the logprobs of the tokens generated for the
        calls (backends/tool_calls.py: extra["call_tokens"]); a remote answer's stay as sent."""
        gens = (gen, *gen.choices)
        out = []
        for i, choice in enumerate(choices):
            tokens = gens[i].extra.get("call_tokens") if i < len(gens) else None
            if isinstance(choice, dict) and choice.get("logprobs") is None and tokens is not None:
                choice = {**choice, "logprobs": chat_logprobs(tokens, self.top_logprobs)}
            out.append(choice)
        return out


async def _stream(svc: Service, router: Router, req: GenerationRequest, endpoint: str, shape: _Shape,
                  request: Request, started: float, category: ResolvedCategory) -> ChatStream:
    source = cast(AsyncGenerator[RoutedDelta, None], router.route_stream(req).__aiter__())
    try:  # route before the first byte: errors are still clean 4xx/5xx
        first = await until_disconnect(request, source.__anext__())
    except LocalrouteError as exc:
        await source.aclose()
        svc.record(_failed(req, endpoint, router.policy, True, exc, started))
        raise
    _label(first.decision, category)
    headers = {**routing_headers(first.decision, final=first.routed is not None),
               "x-localroute-category": category.name}
    return ChatStream(_chunks(svc, router, req, endpoint, shape, source, first, started), headers)


def _stream_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed choice as one stream delta (a buffered remote answer sent to a streaming
    client): the message becomes the delta, each tool call gets the `index` deltas carry."""
    delta = dict(choice.get("message") or {})
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [{"index": i, **c} if isinstance(c, dict) else c for i, c in enumerate(calls)]
    return {"index": choice.get("index", 0), "delta": delta, "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason")}


async def _chunks(svc: Service, router: Router, req: GenerationRequest, endpoint: str, shape: _Shape,
                  source: AsyncGenerator[RoutedDelta, None], first: RoutedDelta,
                  started: float) -> AsyncIterator[Chunk]:
    """The stream's chunks. A remote tier's chunks pass as sent (id, model, created set), except
    that its closing chunks (finish reasons, usage) are held until the end so the last one can
    carry `localroute` and the cost; a usage chunk the client did not ask for is dropped."""
    created = int(time.time())
    obj = "chat.completion.chunk" if shape.chat else "text_completion"
    base = {"id": req.request_id, "object": obj, "created": created, "model": shape.model}
    ttft: float | None = None
    outcome = RequestRecord(req.request_id, endpoint, router.policy, True, 200, started, 0.0)
    role_sent = False
    roles: set[int] = set()  # the choices whose first chunk (the role) went out
    finished: set[int] = set()  # n > 1: the choices whose finish chunk went out as they finished
    held: list[Chunk] = []

    def local(choice: dict[str, Any]) -> list[Chunk]:
        out = []
        index = choice["index"]
        if shape.chat and index not in roles and not role_sent:
            roles.add(index)
            out.append({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        out.append({**base, "choices": [choice]})
        return out

    try:
        item: RoutedDelta | None = first
        while item is not None:
            if item.routed is not None:
                gen, decision = item.routed.generation, item.routed.decision
                cost = svc.monitoring.price(decision, gen, started) if svc.monitoring else None
                outcome.extra.update(cost=cost, request=req)
                for chunk in _closing(shape, base, gen, decision, held, local, cost, finished):
                    yield chunk
                outcome.decision, outcome.generation = decision, gen
                break
            d = item.delta
            if d.raw is not None and shape.chat:
                role_sent = True
                chunk = {**d.raw, "id": req.request_id, "model": shape.model}
                if chunk.get("usage") is not None or any(c.get("finish_reason") for c in chunk.get("choices") or ()) \
                        or (held and NATIVE_EVENTS in chunk):  # a provider event after them keeps its place
                    held.append(chunk)
                else:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    yield chunk
            elif d.finish_reason is not None and not d.text:  # n > 1: one choice is done, others go on
                finished.add(d.index)
                for chunk in local(_finish_choice(shape, d.index, d.finish_reason)):
                    yield chunk
            elif d.text or d.token is not None:
                tokens = [d.token] if d.token is not None else []
                if shape.chat:
                    choice: dict[str, Any] = {
                        "index": d.index, "delta": {"content": d.text}, "finish_reason": None,
                        "logprobs": chat_logprobs(tokens, shape.top_logprobs) if shape.want_logprobs else None}
                else:
                    choice = {"index": d.index, "text": d.text, "finish_reason": None,
                              "logprobs": completion_logprobs(tokens, shape.top_logprobs)
                              if shape.want_logprobs else None}
                ttft = ttft if ttft is not None else time.perf_counter() - started
                for chunk in local(choice):
                    yield chunk
            item = await source.__anext__()
    except LocalrouteError as exc:  # bytes already sent: the caller ends with an error event
        outcome.status_code, outcome.error = exc.status_code, exc.code or exc.error_type
        raise
    except BaseException:
        outcome.disconnected, outcome.status_code, outcome.error = True, 499, "client_disconnected"
        raise
    finally:
        await source.aclose()
        outcome.latency_s = time.perf_counter() - started
        outcome.ttft_s = ttft
        svc.record(outcome)


def _finish_choice(shape: _Shape, index: int, reason: str) -> dict[str, Any]:
    """A local choice's finish chunk: no text, its finish_reason."""
    done: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": None}
    if shape.chat:
        done["delta"] = {}
    else:
        done["text"] = ""
    return done


def _closing(shape: _Shape, base: Chunk, gen: Generation, decision: Decision, held: list[Chunk],
             local: Callable[[dict[str, Any]], list[Chunk]], cost: RequestCost | None,
             finished: set[int]) -> list[Chunk]:
    """The stream's last chunks, the routing block on the very last. `finished`: the choices
    whose finish chunk already went out (n > 1, as each finished)."""
    cost_usd = cost.cost_usd if cost is not None else None
    out: list[Chunk]
    raw = gen.raw if shape.chat else None
    if held or raw is not None:
        if held:  # a remote stream's closing chunks
            out = [c for c in held if c.get("choices") or shape.include_usage or NATIVE_EVENTS in c]
        else:  # a buffered remote answer, whole, as one chunk
            assert raw is not None
            choices = raw.get("choices") or []
            if shape.want_logprobs:  # a local tool call's tokens, when asked for
                choices = shape.call_logprobs(choices, gen)
            out = [{**base, "choices": [_stream_choice(c) for c in choices]}]
            if isinstance(gen.extra.get("native"), dict):  # the Responses / Messages edge streams it whole
                out[0][NATIVE_ANSWER] = gen.extra["native"]
            if shape.include_usage:
                out.append({**base, "choices": [], "usage": raw.get("usage") or usage(gen)})
        for chunk in out:
            if chunk.get("usage") is not None:
                chunk["usage"] = usage_with_cost(chunk["usage"], cost_usd)
        if not out:
            out = [{**base, "choices": []}]
    else:
        out = []
        for index, g in enumerate((gen, *gen.choices)):  # n > 1: the finish of every choice not yet sent
            if index not in finished:
                out += local(_finish_choice(shape, index, g.finish_reason))
        if shape.include_usage:
            out.append({**base, "choices": [], "usage": usage_with_cost(usage(gen), cost_usd)})
        if not out:
            out = [{**base, "choices": []}]
    out[-1]["localroute"] = _info(decision, cost, gen)
    return out
