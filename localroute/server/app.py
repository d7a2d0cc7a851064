"""The OpenAI-compatible app. `create_app(settings)` builds tiers from settings at start-up;
tests may pass ready `tiers` instead (real or scripted backends)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from localroute import __version__
from localroute.backends.base import load_backend
from localroute.errors import InvalidRequestError, LocalrouteError, ModelNotFoundError
from localroute.routing.base import Decision, Routed, RoutedDelta, Tier
from localroute.routing.cascade import CascadeRouter
from localroute.server.errors import error_body, install_error_handlers
from localroute.server.schemas import ChatCompletionRequest, CompletionRequest
from localroute.settings import Settings
from localroute.types import Generation, GenerationRequest, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

CASCADE = "localroute/cascade"


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
                self.tiers, settings.confidence_aggregator, settings.confidence_quantile_alpha, CASCADE
            )
        }
        for tier in self.tiers:  # a tier's name bypasses routing
            self.routers[tier.name] = CascadeRouter(
                [Tier(tier.name, tier.backend, None)], settings.confidence_aggregator,
                settings.confidence_quantile_alpha, tier.name,
            )
        self.observers: list[Observer] = []
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

    async def aclose(self) -> None:
        for tier in self.tiers:
            await tier.backend.aclose()


def build_tiers(settings: Settings) -> list[Tier]:
    ladder = settings.ladder()
    tiers = []
    for i, ts in enumerate(ladder):
        last = i == len(ladder) - 1
        threshold = None if last else (ts.threshold if ts.threshold is not None else settings.default_threshold)
        tiers.append(Tier(ts.name, load_backend(ts, settings), threshold))
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
    info = {
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
    if cost:
        info.update(cost)
    return info


def _num(x: float | None) -> float | None:
    if x is None or x != x:
        return None
    return max(x, -1e9)  # -inf is not JSON


def routing_headers(decision: Decision, final: bool = True) -> dict[str, str]:
    headers = {
        "x-localroute-tier": decision.answered_by,
        "x-localroute-escalated": "true" if decision.escalated or not final and _pending_escalation(decision) else "false",
        "x-localroute-policy": decision.policy,
    }
    conf = decision.confidence if final else None
    if conf is not None and conf == conf:
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
        holder["service"] = service
        app.state.service = service
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="localroute", version=__version__, lifespan=lifespan)
    install_error_handlers(app)

    def service() -> Service:
        return holder["service"]

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Callable[[Request], Any]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(
                error_body(f"request body over {settings.max_body_bytes} bytes", "invalid_request_error", None,
                           "request_too_large"),
                status_code=413,
            )
        response: Response = await call_next(request)
        return response

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

    async def _parse(request: Request, model: type[ChatCompletionRequest] | type[CompletionRequest]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequestError("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise InvalidRequestError(f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                                      param=param, code="invalid_value") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        svc = service()
        router = svc.router(body.model)
        gen_request = chat_request(body, settings, request_id)
        k = gen_request.params.top_logprobs
        if body.stream:
            return await _stream(svc, router, gen_request, "chat", bool(body.logprobs), k,
                                 bool(body.stream_options and body.stream_options.include_usage), body.model)
        started = time.perf_counter()
        routed = await _route(svc, router, gen_request, "chat", started)
        gen, decision = routed.generation, routed.decision
        payload = {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "logprobs": chat_logprobs(gen.tokens, k) if body.logprobs else None,
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": usage(gen),
            "localroute": routing_info(decision),
        }
        return JSONResponse(payload, headers=routing_headers(decision))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        svc = service()
        router = svc.router(body.model)
        gen_request = completion_request(body, settings, request_id)
        k = gen_request.params.top_logprobs
        want_lp = body.logprobs is not None
        if body.stream:
            return await _stream(svc, router, gen_request, "completion", want_lp, k,
                                 bool(body.stream_options and body.stream_options.include_usage), body.model)
        started = time.perf_counter()
        routed = await _route(svc, router, gen_request, "completion", started)
        gen, decision = routed.generation, routed.decision
        payload = {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "text": gen.text,
                    "logprobs": completion_logprobs(gen.tokens, k) if want_lp else None,
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": usage(gen),
            "localroute": routing_info(decision),
        }
        return JSONResponse(payload, headers=routing_headers(decision))

    async def _route(svc: Service, router: CascadeRouter, req: GenerationRequest, endpoint: str,
                     started: float) -> Routed:
        try:
            routed = await router.route(req)
        except LocalrouteError as exc:
            svc.record(RequestRecord(req.request_id, endpoint, router.policy, False, exc.status_code, started,
                                     time.perf_counter() - started, error=exc.code or exc.error_type))
            raise
        svc.record(RequestRecord(req.request_id, endpoint, router.policy, False, 200, started,
                                 time.perf_counter() - started, routed.generation.ttft_s, routed.decision,
                                 routed.generation))
        return routed

    async def _stream(svc: Service, router: CascadeRouter, req: GenerationRequest, kind: str, want_lp: bool,
                      k: int, include_usage: bool, model: str) -> Response:
        started = time.perf_counter()
        source = router.route_stream(req).__aiter__()
        try:
            first = await source.__anext__()  # route before the first byte: errors are still clean 4xx/5xx
        except LocalrouteError as exc:
            svc.record(RequestRecord(req.request_id, kind, router.policy, True, exc.status_code, started,
                                     time.perf_counter() - started, error=exc.code or exc.error_type))
            raise
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": req.request_id, "object": obj, "created": created, "model": model, "choices": choices,
                    **extra}
            return f"data: {json.dumps(data)}\n\n"

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
                        done.update({"delta": {}} if kind == "chat" else {"text": ""})
                        yield chunk([done], localroute=routing_info(decision))
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
