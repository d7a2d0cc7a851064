"""The OpenAI-compatible app. `create_app(settings)` builds tiers from settings at start-up;
tests may pass ready `tiers` instead (real or scripted backends)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from localroute import __version__
from localroute.auth import ApiKeyStore, AuthMiddleware
from localroute.backends.base import load_backend
from localroute.backends.supervised import supervised
from localroute.budget import attach_budget
from localroute.cost import RequestCost, cost_fields, cost_headers
from localroute.errors import InvalidRequestError, LocalrouteError, ModelNotFoundError
from localroute.feedback import FeedbackRequest
from localroute.metrics import CONTENT_TYPE_LATEST, Monitoring
from localroute.routing.base import Decision, Routed, RoutedDelta, Tier
from localroute.routing.cascade import CascadeRouter
from localroute.routing.repetition import RepetitionCheck
from localroute.server.errors import error_body, install_error_handlers
from localroute.server.schemas import ChatCompletionRequest, CompletionRequest
from localroute.server.timing import ServerTimingMiddleware
from localroute.settings import Settings
from localroute.types import Generation, GenerationRequest, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

CASCADE = "localroute/cascade"


class RequestTooLargeError(InvalidRequestError):
    status_code = 413
    code = "request_too_large"


class RequestTimeoutError(InvalidRequestError):
    """The body did not arrive in time; the answer closes the connection (server/errors.py)."""

    status_code = 408
    code = "request_timeout"


class ClientDisconnectedError(LocalrouteError):
    """The client went away; its work was cancelled. Nobody reads this answer (nginx's 499)."""

    status_code = 499
    error_type = "client_closed_request"
    code = "client_disconnected"


class BodyLimitMiddleware:
    """Size and time limits on a request body, before any parsing. Size: 413 at once by
    Content-Length, else (chunked bodies) as soon as the bytes received pass the cap, without
    buffering the rest. Time: the whole body must arrive within `timeout_s` of its headers, else 408
    (8 of 100 promised bytes, or a chunked body that never ends, no longer hold a connection and a
    task for ever). Pure ASGI, so it adds no task; once the body is in, reads are not timed (the
    disconnect watcher's wait for `http.disconnect` is not a body read)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _error(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"request body over {self.max_bytes} bytes")

    async def __call__(self, scope: Any, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            exc = self._error()
            await JSONResponse(error_body(exc.message, exc.error_type, None, exc.code), 413)(scope, receive, send)
            return
        received = 0
        timeout_s = self.timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

        async def limited() -> Any:
            nonlocal received, deadline
            if deadline is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeoutError(f"request body not received within {timeout_s:g}s") from None
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # mapped to the 413 body by the LocalrouteError handler
                if not message.get("more_body", False):
                    deadline = None  # the body is in
            else:
                deadline = None  # http.disconnect
            return message

        await self.app(scope, limited, send)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work` in this task, cancelling it if the client disconnects first
    (ClientDisconnectedError): a local decode for nobody must stop and free its slot; a frontier
    call must be aborted. A watcher task waits for the ASGI `http.disconnect` message (the body has
    been read, so that is the only message left) and cancels this task when it comes: no polling,
    and the work's result needs no extra hop through another task."""
    me = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                gone = True
                if me is not None:
                    me.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        if me is not None:
            me.uncancel()  # the cancellation was ours, turned into an error: not the task's own
        raise ClientDisconnectedError("client disconnected") from None
    finally:
        watcher.cancel()


_KEY_BEFORE = re.compile(r'"((?:[^"\\]|\\.){1,100})"\s*:\s*-?$')  # the key whose value failed to parse


def parse_json_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """A request body as a JSON object, or InvalidRequestError (400) saying why not.

    orjson, because the standard parser lets through what JSON forbids and no engine may see (NaN
    and Infinity literals, numbers that overflow to infinity such as 1e400, lone "\\ud800"
    surrogates) and raises RecursionError, a 500, past about 1,000 levels of nesting. orjson refuses
    all of these (its own nesting limit is 1,024); the tighter `max_depth` is then checked without
    recursion, because what reads the body next (pydantic, a grammar, jsonschema, the frontier
    client's encoder) recurses."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg:
            raise InvalidRequestError(f"request body nests deeper than {max_depth} levels") from None
        key = _KEY_BEFORE.search(exc.doc, max(0, exc.pos - 200), exc.pos) if isinstance(exc.doc, str) else None
        param = key.group(1) if key else None  # `"temperature": NaN` names temperature
        where = f" in {param!r}" if param else ""
        raise InvalidRequestError(f"request body is not valid JSON{where}: {exc.msg} at position {exc.pos}",
                                  param=param) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if nests_deeper(data, max_depth):
        raise InvalidRequestError(f"request body nests deeper than {max_depth} levels")
    return data


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether `value` holds objects/arrays nested more than `limit` deep (the top one is level 1).
    Iterative: a stack of (container, level), each container visited once."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if level >= limit:
                    return True
                stack.append((child, level + 1))
    return False


def dumps(content: Any) -> bytes:
    """Compact JSON for answers and stream chunks, by orjson (numpy scalars and non-string keys
    included; NaN and infinities, which answers never carry, become null). What orjson refuses, a
    lone surrogate in a frontier's text or an integer beyond 64 bits, goes through the standard
    encoder, which escapes it."""
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(content, separators=(",", ":"), default=_plain).encode()


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    return item() if callable(item) else str(value)


class AnswerResponse(JSONResponse):
    """An answer's JSON body, encoded by `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


class RequestRoute(APIRoute):
    """A route whose endpoint takes the Request and returns a Response itself (it reads and validates
    its own body, so bad input gets an OpenAI-shaped 400): FastAPI's dependency solving and response
    serialisation are skipped on the request path, and OpenAPI still documents the route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline_refs(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def request_body_schema(model: type[Any]) -> dict[str, Any]:
    """OpenAPI requestBody for a route that parses its raw body itself (so bad input gets an
    OpenAI-shaped 400, not FastAPI's 422): the pydantic model's JSON schema, refs inlined."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_refs(schema, schema.get("$defs", {}))}}}}


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; handed to every observer (routing log, metrics, ...)."""

    request_id: str
    endpoint: str
    policy: str
    stream: bool
    status_code: int
    started_at: float
    latency_s: float
    ttft_s: float | None = None
    decision: Decision | None = None
    generation: Generation | None = None
    error: str | None = None
    disconnected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[RequestRecord], None]


class Service:
    """The routers by model id and the observers of finished requests."""

    def __init__(self, settings: Settings, tiers: Sequence[Tier]) -> None:
        self.settings = settings
        self.tiers = list(tiers)
        self.routers: dict[str, CascadeRouter] = {
            CASCADE: CascadeRouter(
                self.tiers, settings.confidence_aggregator, settings.confidence_quantile_alpha, CASCADE,
                on_failure=settings.escalation_failure_policy,
                on_budget="degrade" if settings.budget_exhausted_policy == "degrade" else "fail",
                repetition=RepetitionCheck(settings.repetition_min_repeats, settings.repetition_min_coverage),
            )
        }
        self.budget = attach_budget(self.tiers, settings)
        for tier in self.tiers:  # a tier's name bypasses routing
            self.routers[tier.name] = CascadeRouter(
                [Tier(tier.name, tier.backend, None)], settings.confidence_aggregator,
                settings.confidence_quantile_alpha, tier.name,
            )
        from localroute.routing.hybrid import (
            build_policies,  # classifier/embedding/hybrid/verified, if configured
        )

        self.routers.update(build_policies(settings, self.tiers, self.routers[CASCADE]))
        self.feedback: Any = None  # localroute.feedback.FeedbackStore when the routing log is on (lifespan)
        self.observers: list[Observer] = []
        self.monitoring: Monitoring | None = None  # telemetry, costs, metrics, routing log (lifespan)
        self.created = int(time.time())

    def router(self, model: str) -> CascadeRouter:
        router = self.routers.get(model)
        if router is None:
            raise ModelNotFoundError(
                f"model {model!r} not found; available: {', '.join(self.routers)}", param="model"
            )
        return router

    def record(self, rec: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer(rec)
            except Exception:  # an observer must never break a response
                log.exception("observer %r failed", observer)

    async def record_async(self, rec: RequestRecord) -> None:
        """`record` on the event loop, for a response's background task (a plain function would
        be sent to a worker thread)."""
        self.record(rec)

    async def aclose(self) -> None:
        for tier in self.tiers:
            await tier.backend.aclose()


def build_tiers(settings: Settings) -> list[Tier]:
    """Load the ladder. Thresholds: a tier's own `threshold`, else the calibration file's (when its
    model hash, template and aggregator still match; otherwise a loud warning), else the default."""
    ladder = settings.ladder()
    backends = [supervised(ts, settings, load_backend) for ts in ladder]  # native engines in their own process
    calibrated: dict[str, float] = {}
    if settings.calibration_path is not None:
        from localroute.calibration import backend_fingerprint, calibrated_thresholds

        fingerprints = {ts.name: backend_fingerprint(b) for ts, b in zip(ladder[:-1], backends[:-1])}
        calibrated = calibrated_thresholds(settings.calibration_path, settings.confidence_aggregator,
                                           settings.confidence_quantile_alpha, fingerprints)
    tiers = []
    for i, (ts, backend) in enumerate(zip(ladder, backends)):
        last = i == len(ladder) - 1
        threshold = None if last else ts.threshold
        if threshold is None and not last:
            threshold = calibrated.get(ts.name, settings.default_threshold)
        elif ts.name in calibrated and not last:
            log.warning("tier %s: configured threshold %s overrides the calibrated %s", ts.name, threshold,
                        calibrated[ts.name])
        tiers.append(Tier(ts.name, backend, threshold))
    return tiers


# ---------- request -> GenerationRequest ----------


def _sampling(body: ChatCompletionRequest | CompletionRequest, settings: Settings, top_logprobs: int) -> SamplingParams:
    if body.n not in (None, 1):
        raise InvalidRequestError("n > 1 is not supported; send one request per answer", param="n")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or settings.default_max_tokens
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stops(),
        top_logprobs=top_logprobs,
        response_format=getattr(body, "response_format", None),
        ignore_eos=body.ignore_eos,
    )


def chat_request(body: ChatCompletionRequest, settings: Settings, request_id: str) -> GenerationRequest:
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    messages = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise InvalidRequestError(f"messages.{i}.content: {exc}", param=f"messages.{i}.content") from None
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": text})
    top = (body.top_logprobs or 0) if body.logprobs else 0
    return GenerationRequest(
        messages=tuple(messages), params=_sampling(body, settings, top), request_id=request_id
    )


def completion_request(body: CompletionRequest, settings: Settings, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        prompt=body.prompt_text(), params=_sampling(body, settings, body.logprobs or 0), request_id=request_id
    )


# ---------- responses ----------


def routing_info(decision: Decision, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "policy": decision.policy,
        "tier": decision.answered_by,
        "confidence": _num(decision.confidence),
        "escalated": decision.escalated,
        "signal": decision.signal,
        "degraded": decision.degraded,
        "attempts": [
            {
                "tier": a.tier,
                "confidence": _num(a.confidence),
                "threshold": a.threshold,
                "accepted": a.accepted,
                "prompt_tokens": a.prompt_tokens,
                "completion_tokens": a.completion_tokens,
                "latency_s": round(a.latency_s, 6),
                "error": a.error,
            }
            for a in decision.attempts
        ],
    }
    if decision.evidence:  # pre-inference router scores, verifier P(Yes), schema violations
        info["evidence"] = decision.evidence
    if cost:
        info.update(cost)
    return info


def _num(x: float | None) -> float | None:
    if x is None or math.isnan(x):
        return None
    return max(x, -1e9)  # -inf is not JSON


def routing_headers(decision: Decision, final: bool = True) -> dict[str, str]:
    headers = {
        "x-localroute-tier": decision.answered_by,
        "x-localroute-escalated": "true" if decision.escalated or not final and _pending_escalation(decision) else "false",
        "x-localroute-policy": decision.policy,
    }
    conf = decision.confidence if final else None
    if conf is not None and not math.isnan(conf):
        headers["x-localroute-confidence"] = f"{_num(conf):.6f}"
    if decision.degraded:
        headers["x-localroute-degraded"] = decision.degraded
    return headers


def _pending_escalation(decision: Decision) -> bool:
    return any(a.tier != decision.answered_by for a in decision.attempts)


def chat_logprobs(tokens: list[TokenLogprob], k: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes) if t.bytes is not None else None,
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes) if a.bytes is not None else None}
                    for a in t.top_logprobs[:k]
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[TokenLogprob], k: int, offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs[:k]} for t in tokens],
        "text_offset": offsets,
    }


def usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def create_app(
    settings: Settings | None = None,
    tiers: Sequence[Tier] | None = None,
    observers: Sequence[Observer] = (),
) -> FastAPI:
    """Build the app. Backends are loaded at start-up (lifespan) unless `tiers` is given."""
    settings = settings or Settings()
    holder: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings, tiers if tiers is not None else build_tiers(settings))
        service.observers.extend(observers)
        service.monitoring = Monitoring(settings, service.tiers)
        service.observers.extend(service.monitoring.observers)
        if settings.routing_log_path is not None:  # feedback and the review sample live in the routing log
            from localroute.feedback import FeedbackStore, ReviewSampler

            service.feedback = FeedbackStore(settings.routing_log_path)
            if settings.review_sample_rate > 0:
                service.observers.append(ReviewSampler(service.feedback, settings.review_sample_rate))
        holder["service"] = service
        app.state.service = service
        try:
            yield
        finally:
            try:
                await service.aclose()
            finally:
                service.monitoring.close()  # after the backends: late rows still reach the log

    app = FastAPI(title="localroute", version=__version__, lifespan=lifespan)
    install_error_handlers(app)

    def service() -> Service:
        return holder["service"]

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.http_body_timeout_s)
    api_keys = ApiKeyStore.from_settings(settings)
    if api_keys is not None:  # added after the body limit: no body is read for a caller without a key
        app.add_middleware(AuthMiddleware, keys=api_keys, public_paths=settings.public_paths)

    def overhead_observer() -> Callable[[float], None] | None:
        monitoring = holder["service"].monitoring if "service" in holder else None
        return monitoring.metrics.router_overhead.observe if monitoring is not None else None

    # outermost: the router overhead it reports includes auth and the body limit
    app.add_middleware(ServerTimingMiddleware, observe=overhead_observer)

    @app.get("/metrics")
    async def metrics() -> Response:
        monitoring = service().monitoring
        body = monitoring.metrics.exposition() if monitoring is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        svc = service()
        tiers_health = {t.name: t.backend.health() for t in svc.tiers}
        ok = all(h.get("ok") for t, h in zip(svc.tiers, tiers_health.values()) if t.backend.is_local)
        return JSONResponse({"status": "ok" if ok else "unavailable", "tiers": tiers_health},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        svc = service()
        return {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": svc.created, "owned_by": "localroute"}
                for model_id in svc.routers
            ],
        }

    def post(path: str, model: type[Any]) -> Callable[[Callable[[Request], Awaitable[Response]]], Any]:
        """A POST endpoint that parses its own body (RequestRoute), documented with `model`'s schema."""
        def add(endpoint: Callable[[Request], Awaitable[Response]]) -> Any:
            app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=RequestRoute,
                                     openapi_extra=request_body_schema(model))
            return endpoint
        return add

    @post("/v1/feedback", FeedbackRequest)
    async def feedback(request: Request) -> JSONResponse:
        """{request_id, score | correct, source}: stored against the request's routing-log row."""
        body = await _parse(request, FeedbackRequest)  # type: ignore[arg-type]
        svc = service()
        if svc.feedback is None:
            raise InvalidRequestError("feedback needs the routing log: set routing_log_path", code="feedback_disabled")
        if svc.monitoring is not None and svc.monitoring.routing_log is not None:
            await asyncio.to_thread(svc.monitoring.routing_log.flush)  # the row may still be queued
        return JSONResponse(await asyncio.to_thread(svc.feedback.add, body))

    async def _parse(request: Request, model: type[ChatCompletionRequest | CompletionRequest]) -> Any:
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client left (or its connection was closed) mid-body
            raise ClientDisconnectedError("client disconnected") from None
        data = parse_json_body(raw, settings.max_json_depth)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise InvalidRequestError(f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                                      param=param, code="invalid_value") from None

    @post("/v1/chat/completions", ChatCompletionRequest)
    async def chat_completions(request: Request) -> Response:
        svc, body, router, gen_request, started = await _accept(request, ChatCompletionRequest, chat_request,
                                                                "chat", "chatcmpl")
        k = gen_request.params.top_logprobs
        if body.stream:
            return await _stream(svc, router, gen_request, "chat", bool(body.logprobs), k,
                                 bool(body.stream_options and body.stream_options.include_usage), body.model,
                                 request)
        routed, cost, record = await _route(svc, router, gen_request, "chat", started, request)
        return _answer(svc, request, routed, cost, record, "chat.completion", body.model, lambda gen: {
            "message": {"role": "assistant", "content": gen.text},
            "logprobs": chat_logprobs(gen.tokens, k) if body.logprobs else None,
        })

    @post("/v1/completions", CompletionRequest)
    async def completions(request: Request) -> Response:
        svc, body, router, gen_request, started = await _accept(request, CompletionRequest, completion_request,
                                                                "completion", "cmpl")
        k = gen_request.params.top_logprobs
        want_lp = body.logprobs is not None
        if body.stream:
            return await _stream(svc, router, gen_request, "completion", want_lp, k,
                                 bool(body.stream_options and body.stream_options.include_usage), body.model,
                                 request)
        routed, cost, record = await _route(svc, router, gen_request, "completion", started, request)
        return _answer(svc, request, routed, cost, record, "text_completion", body.model, lambda gen: {
            "text": gen.text,
            "logprobs": completion_logprobs(gen.tokens, k) if want_lp else None,
        })

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

    async def _accept(request: Request, model: Any, build: Callable[[Any, Settings, str], GenerationRequest],
                      endpoint: str, id_prefix: str) -> tuple[Service, Any, CascadeRouter, GenerationRequest, float]:
        """Parse the body, pick the router, build the engine request; a refusal is logged, then raised."""
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        svc = service()
        started = time.perf_counter()
        try:
            body = await _parse(request, model)
            router = svc.router(body.model)
            return svc, body, router, build(body, settings, request_id), started
        except LocalrouteError as exc:
            _rejected(svc, request_id, endpoint, exc, started)
            raise

    def _rejected(svc: Service, request_id: str, endpoint: str, exc: LocalrouteError, started: float) -> None:
        """A request refused before routing (bad body, unknown model) still gets its log row and
        metrics; its policy label is fixed, so clients cannot grow the metrics' label set."""
        svc.record(RequestRecord(request_id, endpoint, "rejected", False, exc.status_code, started,
                                 time.perf_counter() - started, error=exc.code or exc.error_type))

    async def _route(svc: Service, router: CascadeRouter, req: GenerationRequest, endpoint: str,
                     started: float, request: Request) -> tuple[Routed, RequestCost | None, RequestRecord]:
        try:
            routed: Routed = await until_disconnect(request, router.route(req))
        except LocalrouteError as exc:
            svc.record(RequestRecord(req.request_id, endpoint, router.policy, False, exc.status_code, started,
                                     time.perf_counter() - started, error=exc.code or exc.error_type,
                                     disconnected=isinstance(exc, ClientDisconnectedError)))
            raise
        cost = svc.monitoring.price(routed.decision, routed.generation, started) if svc.monitoring else None
        record = RequestRecord(req.request_id, endpoint, router.policy, False, 200, started,
                               time.perf_counter() - started, routed.generation.ttft_s, routed.decision,
                               routed.generation, extra={"cost": cost, "request": req})
        return routed, cost, record  # recorded by _answer

    async def _stream(svc: Service, router: CascadeRouter, req: GenerationRequest, kind: str, want_lp: bool,
                      k: int, include_usage: bool, model: str, request: Request) -> Response:
        started = time.perf_counter()
        source = cast(AsyncGenerator[RoutedDelta, None], router.route_stream(req).__aiter__())
        try:  # route before the first byte: errors are still clean 4xx/5xx
            first = await until_disconnect(request, source.__anext__())
        except LocalrouteError as exc:
            await source.aclose()
            svc.record(RequestRecord(req.request_id, kind, router.policy, True, exc.status_code, started,
                                     time.perf_counter() - started, error=exc.code or exc.error_type,
                                     disconnected=isinstance(exc, ClientDisconnectedError)))
            raise
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": req.request_id, "object": obj, "created": created, "model": model, "choices": choices,
                    **extra}
            return f"data: {dumps(data).decode()}\n\n"

        def piece(item: RoutedDelta) -> str | None:
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

        async def events() -> AsyncIterator[str]:
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
                        done.update({"delta": {}} if kind == "chat" else {"text": ""})  # type: ignore[dict-item]
                        cost = svc.monitoring.price(decision, gen, started) if svc.monitoring else None
                        outcome.extra.update(cost=cost, request=req)
                        yield chunk([done], localroute=routing_info(decision, cost_fields(cost)))
                        if include_usage:
                            yield chunk([], usage=usage(gen))
                        yield "data: [DONE]\n\n"
                        outcome.decision, outcome.generation = decision, gen
                        break
                    text = piece(item)
                    if text is not None:
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        yield text
                    item = await source.__anext__()
            except LocalrouteError as exc:  # bytes already sent: end with an error event, no [DONE]
                outcome.status_code, outcome.error = exc.status_code, exc.code or exc.error_type
                yield f"data: {json.dumps(error_body(exc.message, exc.error_type, exc.param, exc.code))}\n\n"
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

    return app
