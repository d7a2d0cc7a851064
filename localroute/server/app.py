"""The OpenAI-compatible app. `create_app(settings)` builds the Service (tiers from settings) at
start-up; tests may pass ready `tiers` instead (real or scripted backends).

Endpoints are named functions; each reads the Service from `request.app.state.service`. What a
Chat Completions or Completions request goes through is serving.py's; the wire format protocol.py's.
Responses (server/responses/) and Anthropic Messages (server/anthropic/) translate to chat and back.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from localroute import __version__
from localroute.backends.supervised import SupervisedBackend
from localroute.errors import InvalidRequestError
from localroute.monitoring.feedback import FeedbackRequest
from localroute.monitoring.prometheus import CONTENT_TYPE_LATEST
from localroute.monitoring.record import Observer
from localroute.monitoring.tracing import Tracing, TracingMiddleware, tracing_configured
from localroute.routing.base import Tier
from localroute.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from localroute.server.anthropic.serving import serve_count_tokens, serve_messages
from localroute.server.auth import ApiKeyStore, AuthMiddleware
from localroute.server.errors import install_error_handlers
from localroute.server.http import BodyLimitMiddleware, RequestRoute, parse_body, request_body_schema
from localroute.server.limits import SharedStateMiddleware
from localroute.server.responses.protocol import ResponsesRequest
from localroute.server.responses.serving import get_response, serve_responses
from localroute.server.schemas import ChatCompletionRequest, CompletionRequest
from localroute.server.serving import serve_chat, serve_completion, service_of
from localroute.server.timing import ServerTimingMiddleware
from localroute.service import Monitoring, Service, build_tiers
from localroute.settings import Settings

__all__ = ["create_app"]

Endpoint = Callable[[Request], Awaitable[Response]]


async def metrics(request: Request) -> Response:
    monitoring = service_of(request).monitoring
    body = monitoring.metrics.exposition() if monitoring is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> JSONResponse:
    svc = service_of(request)
    tiers_health = {t.name: t.backend.health() for t in svc.tiers}
    ok = all(h.get("ok") for t, h in zip(svc.tiers, tiers_health.values()) if t.backend.is_local)
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "tiers": tiers_health}
    if svc.budget is not None:
        body["budget"] = await svc.budget_snapshot()
    if svc.shared_state is not None:  # reported, never a reason for 503: fail_open serves without it
        body["shared_state"] = svc.shared_state.snapshot()
    return JSONResponse(body, status_code=200 if ok else 503)


def _model(svc: Service, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": svc.created, "owned_by": "localroute"}


async def models(request: Request) -> dict[str, Any]:
    svc = service_of(request)
    return {"object": "list", "data": [_model(svc, model_id) for model_id in svc.routers]}


async def model_object(request: Request, model_id: str) -> dict[str, Any]:
    """OpenAI's model object; an unknown id is OpenAI's 404 model_not_found. Ids may hold '/'."""
    svc = service_of(request)
    svc.router(model_id)  # ModelNotFoundError
    return _model(svc, model_id)


async def feedback(request: Request) -> JSONResponse:
    """{request_id, score | correct, source}: stored against the request's routing-log row."""
    svc = service_of(request)
    body = await parse_body(request, FeedbackRequest, svc.settings.max_json_depth)
    if svc.feedback is None:
        raise InvalidRequestError("feedback needs the routing log: set routing_log_path or routing_log_url",
                                  code="feedback_disabled")
    if svc.monitoring is not None and svc.monitoring.routing_log is not None:
        await asyncio.to_thread(svc.monitoring.routing_log.flush)  # the row may still be queued
    return JSONResponse(await asyncio.to_thread(svc.feedback.add, body))


def _start_service(settings: Settings, tiers: Sequence[Tier] | None, observers: Sequence[Observer],
                   tracing: Tracing | None = None) -> Service:
    ladder = tiers if tiers is not None else build_tiers(settings)
    loop = asyncio.get_running_loop()
    for tier in ladder:  # an engine process's answers wake the serving loop itself, not a reader thread first
        if isinstance(tier.backend, SupervisedBackend):
            tier.backend.read_on(loop)
    service = Service(settings, tracing.instrument(ladder) if tracing is not None else ladder)
    if tracing is not None:  # first: the request's span gets its routing outcome before it ends
        service.observers.append(tracing.observe)
    service.observers.extend(observers)
    service.monitoring = Monitoring(settings, service.tiers, shared_state=service.shared_state)
    service.observers.extend(service.monitoring.observers)
    if service.rate_limiter is not None:
        service.observers.append(_token_counter(service))
    target = settings.routing_log_target()
    if target is not None:  # feedback, the review sample and stored Responses live in the routing log
        from localroute.monitoring.feedback import FeedbackStore, ReviewSampler
        from localroute.monitoring.response_store import ResponseStore

        service.feedback = FeedbackStore(target)
        failures = service.monitoring.metrics.response_store_failures
        service.responses = ResponseStore(target, settings.routing_log_retention_days,
                                          on_failure=lambda reason: failures.labels(reason).inc())
        if settings.review_sample_rate > 0:
            service.observers.append(ReviewSampler(service.feedback, settings.review_sample_rate))
    return service


def _token_counter(service: Service) -> Observer:
    """Count each finished request's tokens against its key's tokens/min (observers run in the
    request's context, so the key id is the request's)."""
    from localroute.backends.budget import current_key_id

    def observe(rec: Any) -> None:
        gen = rec.generation
        if gen is not None and service.rate_limiter is not None:
            service.rate_limiter.add_tokens(current_key_id.get(), (gen.prompt_tokens or 0) + (gen.completion_tokens or 0))

    return observe


def freeze_startup_heap(full: bool = False) -> None:
    """Move every object start-up made (modules, settings, engines' Python state) to the collector's
    permanent generation, as vLLM's API server does: the oldest-generation collections that run
    while serving then skip it, and their pauses stall every request on the event loop (in a
    process holding a large heap, such as a test runner's, one pass took 0.3-0.9 s). The young
    generations are collected first (cheap); `full` collects all of them (a fresh process's small
    heap, such as an engine child's)."""
    gc.collect() if full else gc.collect(1)
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    tiers: Sequence[Tier] | None = None,
    observers: Sequence[Observer] = (),
    tracer_provider: Any = None,
) -> FastAPI:
    """Build the app. Backends are loaded at start-up (lifespan) unless `tiers` is given.
    `tracer_provider`: an OpenTelemetry TracerProvider to trace with instead of the one the
    settings configure (monitoring/tracing.py)."""
    settings = settings or Settings()
    tracing: Tracing | None = None
    if tracer_provider is not None or tracing_configured(settings):
        tracing = Tracing.from_settings(settings, tracer_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = _start_service(settings, tiers, observers, tracing)
        app.state.service = service
        from localroute.server.live_quality import LiveQualityRuntime  # categories, shadow, recalibration

        app.state.live_quality = live = LiveQualityRuntime(service)
        await live.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            gc.unfreeze()  # what start-up made is collectable again (tests build many apps in one process)
            try:
                await live.aclose()
                await service.aclose()
            finally:
                if service.monitoring is not None:
                    service.monitoring.close()  # after the backends: late rows still reach the log
                if service.responses is not None:
                    service.responses.close()
                if service.feedback is not None:
                    service.feedback.close()
                if tracing is not None:
                    tracing.close()

    app = FastAPI(title="localroute", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.http_body_timeout_s)
    # inside auth (it needs the key id), outside the body limit (a refused request's body is never read)
    app.add_middleware(SharedStateMiddleware)
    api_keys = ApiKeyStore.from_settings(settings)
    if api_keys is not None:  # added after the body limit: no body is read for a caller without a key
        app.add_middleware(AuthMiddleware, keys=api_keys, public_paths=settings.public_paths)

    def overhead_observer() -> Callable[[float], None] | None:
        service: Service | None = getattr(app.state, "service", None)
        monitoring = service.monitoring if service is not None else None
        return monitoring.metrics.router_overhead.observe if monitoring is not None else None

    if tracing is not None:  # inside the timing: the router overhead includes the tracing's cost
        app.add_middleware(TracingMiddleware, tracing=tracing)
    # outermost: the router overhead it reports includes auth and the body limit
    app.add_middleware(ServerTimingMiddleware, observe=overhead_observer)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model_object, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", get_response, methods=["GET"])
    posts: list[tuple[str, Endpoint, type[Any]]] = [
        ("/v1/feedback", feedback, FeedbackRequest),
        ("/v1/chat/completions", serve_chat, ChatCompletionRequest),
        ("/v1/completions", serve_completion, CompletionRequest),
        ("/v1/responses", serve_responses, ResponsesRequest),
        ("/v1/messages", serve_messages, MessagesRequest),
        ("/v1/messages/count_tokens", serve_count_tokens, CountTokensRequest),
    ]
    for path, endpoint, model in posts:  # each parses its own body (RequestRoute), documented with `model`
        app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=RequestRoute,
                                 openapi_extra=request_body_schema(model))
    return app
