"""OpenTelemetry traces: one span per HTTP request, one per tier attempt, exported over OTLP/HTTP.

Off unless configured (`otlp_endpoint`, or the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT /
OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_SDK_DISABLED=true turns it off again): then nothing here is
imported, no middleware is installed and no backend is wrapped, so the request path pays nothing.
The opentelemetry packages are the `otel` extra, imported only when tracing is on.

Spans (attribute names: the OpenTelemetry GenAI semantic conventions, development status, as of
semconv 1.37+: `gen_ai.provider.name`, not the older `gen_ai.system`):

- the request (kind SERVER, "POST /v1/chat/completions"): its parent is the caller's W3C
  `traceparent` when it sent one. HTTP attributes, the client's `gen_ai.request.*` parameters,
  `gen_ai.request.model` (the model id the client named: a policy or a tier), `gen_ai.response.model`
  and `gen_ai.usage.*` of the answer it got, and localroute's routing: `localroute.tier`,
  `localroute.decision` (accepted | escalated | degraded | failed | rejected), `localroute.confidence`,
  `localroute.escalated`, `localroute.cost_usd`, `localroute.counterfactual_cost_usd`, ...
- each tier attempt ("chat <model>"; kind CLIENT for a remote tier, INTERNAL for an in-process
  engine), a child of the request: the tier's own model, usage, finish reason, and once the
  cascade has judged it `localroute.confidence`, `localroute.threshold`, `localroute.accepted` and
  its `localroute.cost_usd`. A remote tier's HTTP call carries this span as its `traceparent`
  (backends/openai_http.py `trace_headers`), so the upstream's own spans join the trace.

No prompt or answer text is ever put on a span.

How attempts get their spans without the cascade knowing: `Tracing.instrument` wraps each tier's
backend in a `TracedBackend` (every attribute but generate/stream passes through, reads and
writes). An attempt's span is ended with its own end time only when the request's record arrives
(`Tracing.observe`, a Service observer), when the cascade's verdict on it is known.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from localroute import __version__
from localroute.errors import MissingExtraError
from localroute.routing.base import Tier, finite

if TYPE_CHECKING:
    from localroute.monitoring.cost import RequestCost
    from localroute.monitoring.record import RequestRecord
    from localroute.settings import Settings
    from localroute.types import Generation, GenerationRequest, StreamDelta

log = logging.getLogger(__name__)

__all__ = ["TracedBackend", "Tracing", "TracingMiddleware", "tracing_configured"]

_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# paths traced: the API, not the probes and scrapes that would drown it
_UNTRACED = frozenset({"/health", "/metrics"})


def tracing_configured(settings: Settings) -> bool:
    """Whether settings or the standard OTEL_* environment ask for traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(settings.otlp_endpoint) or any(os.environ.get(v) for v in _ENDPOINT_ENV)


def traces_url(endpoint: str) -> str:
    """A collector's base URL as the OTLP/HTTP traces URL (OTEL_EXPORTER_OTLP_ENDPOINT's rule)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def _import_otel() -> tuple[Any, Any]:
    try:
        from opentelemetry import propagate, trace
    except ImportError as exc:
        raise MissingExtraError("opentelemetry-sdk", "otel") from exc
    return trace, propagate


def _provider_from_settings(settings: Settings) -> Any:
    """An SDK TracerProvider with an OTLP/HTTP batch exporter; its own, not the global one."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise MissingExtraError("opentelemetry-exporter-otlp-proto-http", "otel") from exc
    attrs = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):  # the standard variable wins over our default
        attrs["service.name"] = "localroute"
    kwargs: dict[str, Any] = {"resource": Resource.create(attrs)}
    if settings.trace_sample_ratio is not None:
        kwargs["sampler"] = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
    provider = TracerProvider(**kwargs)  # no sampler given: OTEL_TRACES_SAMPLER, else parent-based on
    # the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT/HEADERS/TIMEOUT/COMPRESSION itself
    exporter = OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint)) if settings.otlp_endpoint \
        else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _operation(request: GenerationRequest) -> str:
    return "chat" if request.messages is not None else "text_completion"


def _request_attributes(request: GenerationRequest) -> dict[str, Any]:
    p = request.params
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _operation(request),
        "gen_ai.request.max_tokens": p.max_tokens,
        "gen_ai.request.temperature": p.temperature,
        "gen_ai.request.top_p": p.top_p,
        "gen_ai.output.type": "json" if p.response_format is not None else "text",
    }
    if p.seed is not None:
        attrs["gen_ai.request.seed"] = p.seed
    if p.stop:
        attrs["gen_ai.request.stop_sequences"] = list(p.stop)
    if p.presence_penalty:
        attrs["gen_ai.request.presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        attrs["gen_ai.request.frequency_penalty"] = p.frequency_penalty
    return attrs


def _generation_attributes(gen: Generation) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": gen.prompt_tokens,
        "gen_ai.usage.output_tokens": gen.completion_tokens,
        "gen_ai.response.finish_reasons": [gen.finish_reason],
    }
    if gen.model:
        attrs["gen_ai.response.model"] = gen.model
    upstream_id = gen.extra.get("upstream_id") if gen.extra else None
    if isinstance(upstream_id, str):
        attrs["gen_ai.response.id"] = upstream_id
    return attrs


@dataclass(slots=True)
class _Attempt:
    """One tier call's span, open until the cascade's verdict is known (or the request ends)."""

    tier: str
    span: Any
    end_ns: int | None = None
    ended: bool = False

    def finish(self, end_ns: int | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.span.end(end_time=self.end_ns or end_ns)


@dataclass(slots=True)
class _RequestTrace:
    """The spans of one HTTP request."""

    span: Any
    context: Any
    attempts: list[_Attempt] = field(default_factory=list)
    recorded: bool = False


_current: ContextVar[_RequestTrace | None] = ContextVar("localroute_request_trace", default=None)


class Tracing:
    """The app's tracer. Build with `from_settings` (None when tracing is off) or around a given
    TracerProvider (tests: the SDK's in-memory exporter)."""

    def __init__(self, provider: Any, *, owns_provider: bool = False) -> None:
        trace, propagate = _import_otel()
        self._trace = trace
        self._propagate = propagate
        self.provider = provider
        self._owns = owns_provider
        self.tracer = provider.get_tracer("localroute", __version__)
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._kind = SpanKind
        self._status = Status
        self._code = StatusCode

    @classmethod
    def from_settings(cls, settings: Settings, provider: Any = None) -> Tracing | None:
        if provider is not None:
            return cls(provider)
        if not tracing_configured(settings):
            return None
        return cls(_provider_from_settings(settings), owns_provider=True)

    # ---- the request span (TracingMiddleware) ----

    def start_request(self, scope: MutableMapping[str, Any]) -> _RequestTrace:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        parent = self._propagate.extract(headers)
        method, path = scope.get("method", "GET"), scope.get("path", "")
        span = self.tracer.start_span(
            f"{method} {path}", context=parent, kind=self._kind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "url.scheme": scope.get("scheme", "http"),
                        "network.protocol.version": scope.get("http_version", "1.1")})
        return _RequestTrace(span, self._trace.set_span_in_context(span, parent))

    def end_request(self, rt: _RequestTrace, status: int | None, error: BaseException | None) -> None:
        end = time.time_ns()
        for attempt in rt.attempts:  # a request that ended without its record (a client gone mid-stream)
            attempt.finish(end)
        if status is not None:
            rt.span.set_attribute("http.response.status_code", status)
        if error is not None:
            rt.span.record_exception(error)
            rt.span.set_status(self._status(self._code.ERROR, type(error).__name__))
            rt.span.set_attribute("error.type", type(error).__name__)
        elif status is not None and status >= 500:
            rt.span.set_status(self._status(self._code.ERROR))
            rt.span.set_attributes({"error.type": str(status)})
        rt.span.end(end_time=end)

    # ---- tier attempts (TracedBackend) ----

    def instrument(self, tiers: Sequence[Tier]) -> list[Tier]:
        """The same tiers, each backend wrapped so that its calls get attempt spans."""
        return [Tier(t.name, TracedBackend(t.backend, self, t.name), t.threshold, t.capabilities, t.category_thresholds)
                for t in tiers]

    def start_attempt(self, backend: TracedBackend, request: GenerationRequest) -> _Attempt | None:
        rt = _current.get()
        if rt is None:  # not inside a traced request (bench warm-up, `localroute ask`)
            return None
        inner = backend.inner
        model = str(getattr(inner, "model", "") or backend.tier)
        attrs = _request_attributes(request)
        attrs.update({"gen_ai.request.model": model, "gen_ai.provider.name": str(getattr(inner, "kind", "unknown")),
                      "localroute.tier": backend.tier})
        remote = not inner.is_local
        if remote:
            server = _server_of(getattr(inner, "base_url", None))
            if server is not None:
                attrs["server.address"], attrs["server.port"] = server
        span = self.tracer.start_span(f"{attrs['gen_ai.operation.name']} {model}", context=rt.context,
                                      kind=self._kind.CLIENT if remote else self._kind.INTERNAL, attributes=attrs)
        attempt = _Attempt(backend.tier, span)
        rt.attempts.append(attempt)
        return attempt

    def attempt_done(self, attempt: _Attempt, gen: Generation) -> None:
        attempt.span.set_attributes(_generation_attributes(gen))
        attempt.end_ns = time.time_ns()

    def attempt_failed(self, attempt: _Attempt, exc: BaseException) -> None:
        attempt.end_ns = time.time_ns()
        code = getattr(exc, "code", None) or type(exc).__name__
        attempt.span.set_attribute("error.type", str(code))
        attempt.span.set_status(self._status(self._code.ERROR, str(code)))

    def headers_for(self, attempt: _Attempt) -> dict[str, str]:
        """W3C trace-context headers naming the attempt's span as the remote call's parent."""
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(attempt.span))
        return carrier

    # ---- the routing outcome (a Service observer) ----

    def observe(self, rec: RequestRecord) -> None:
        rt = _current.get()
        if rt is None or rt.recorded:
            return
        rt.recorded = True
        span, decision, cost = rt.span, rec.decision, rec.extra.get("cost")
        req: GenerationRequest | None = rec.extra.get("request")
        attrs: dict[str, Any] = {"localroute.request_id": rec.request_id, "localroute.endpoint": rec.endpoint,
                                 "localroute.policy": rec.policy, "localroute.stream": rec.stream,
                                 "localroute.decision": _verdict(rec)}
        if req is not None:
            attrs.update(_request_attributes(req))
            wire = req.wire.body if req.wire is not None else None
            if isinstance(wire, dict) and isinstance(wire.get("model"), str):
                attrs["gen_ai.request.model"] = wire["model"]
        if rec.generation is not None:
            attrs.update(_generation_attributes(rec.generation))
        if rec.error:
            attrs["error.type"] = rec.error
        if rec.ttft_s is not None:
            attrs["localroute.ttft_s"] = rec.ttft_s
        if decision is not None:
            attrs.update({"localroute.tier": decision.answered_by, "localroute.escalated": decision.escalated,
                          "localroute.signal": decision.signal, "localroute.attempts": len(decision.attempts)})
            conf = finite(decision.confidence)
            if conf is not None:
                attrs["localroute.confidence"] = conf
            if decision.degraded:
                attrs["localroute.degraded"] = decision.degraded
            skipped = decision.evidence.get("skipped")
            if isinstance(skipped, dict) and skipped:
                attrs["localroute.skipped_tiers"] = sorted(skipped)
        if cost is not None:
            attrs["localroute.cost_usd"] = cost.cost_usd
            if cost.counterfactual_cost_usd is not None:
                attrs["localroute.counterfactual_cost_usd"] = cost.counterfactual_cost_usd
            if cost.energy_j is not None:
                attrs["localroute.energy_j"] = cost.energy_j
        span.set_attributes(attrs)
        self._judge_attempts(rt, rec, cost)

    def _judge_attempts(self, rt: _RequestTrace, rec: RequestRecord, cost: RequestCost | None) -> None:
        """Each attempt span gets its verdict (matched to decision.attempts by tier, in order), then ends."""
        decision = rec.decision
        pending = list(rt.attempts)
        for i, a in enumerate(decision.attempts if decision is not None else ()):
            match = next((p for p in pending if p.tier == a.tier and not p.ended), None)
            if match is None:
                continue
            pending.remove(match)
            attrs: dict[str, Any] = {"localroute.accepted": a.accepted}
            conf = finite(a.confidence)
            if conf is not None:
                attrs["localroute.confidence"] = conf
            if a.threshold is not None:
                attrs["localroute.threshold"] = a.threshold
            if cost is not None and i < len(cost.attempts):
                attrs["localroute.cost_usd"] = cost.attempts[i].cost_usd
                attrs["localroute.cost_method"] = cost.attempts[i].method
            if decision is not None and a.tier in decision.evidence.get("repetition", {}):
                attrs["localroute.vetoed"] = "repetition"
            elif decision is not None and a.tier in decision.evidence.get("schema_violations", {}):
                attrs["localroute.vetoed"] = "schema_violation"
            match.span.set_attributes(attrs)
            match.finish()
        for p in pending:  # skipped (context too long) or not part of the decision
            p.finish()

    def close(self) -> None:
        """Flush what is queued; shut the exporter down when the provider is ours."""
        try:
            if self._owns:
                self.provider.shutdown()
            elif hasattr(self.provider, "force_flush"):
                self.provider.force_flush()
        except Exception:  # the collector being down must not break shutdown
            log.warning("tracing: flushing spans failed", exc_info=True)


def _verdict(rec: RequestRecord) -> str:
    if rec.status_code != 200 or rec.decision is None:
        return "rejected" if rec.policy == "rejected" else "failed"
    if rec.decision.degraded:
        return "degraded"
    return "escalated" if rec.decision.escalated else "accepted"


def _server_of(base_url: str | None) -> tuple[str, int] | None:
    """(host, port) of a remote tier's URL: never its path, query or credentials."""
    if not base_url:
        return None
    import httpx

    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    if not url.host:
        return None
    return url.host, url.port or (443 if url.scheme == "https" else 80)


class TracedBackend:
    """A tier's backend with a span per call. Everything else is the wrapped backend's own:
    attribute reads and writes pass through (`budget` attached later lands on the real one)."""

    _OWN = frozenset({"inner", "tier", "_tracing", "_active"})

    def __init__(self, inner: Any, tracing: Tracing, tier: str) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "_tracing", tracing)
        object.__setattr__(self, "_active", {})  # request_id -> the attempt whose call is under way
        if hasattr(inner, "trace_headers"):  # a remote tier: its HTTP call carries the attempt's span
            inner.trace_headers = self._headers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def _headers(self, request: GenerationRequest) -> dict[str, str]:
        attempt = self._active.get(request.request_id)
        return self._tracing.headers_for(attempt) if attempt is not None else {}

    async def generate(self, request: GenerationRequest) -> Generation:
        attempt = self._tracing.start_attempt(self, request)
        if attempt is None:
            return await self.inner.generate(request)  # type: ignore[no-any-return]
        self._active[request.request_id] = attempt
        try:
            gen: Generation = await self.inner.generate(request)
        except BaseException as exc:
            self._tracing.attempt_failed(attempt, exc)
            raise
        finally:
            self._active.pop(request.request_id, None)
        self._tracing.attempt_done(attempt, gen)
        return gen

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        attempt = self._tracing.start_attempt(self, request)
        source = self.inner.stream(request)
        if attempt is not None:
            self._active[request.request_id] = attempt
        try:
            async for delta in source:
                if attempt is not None and delta.final is not None:
                    self._tracing.attempt_done(attempt, delta.final)
                yield delta
        except BaseException as exc:
            if attempt is not None and attempt.end_ns is None:
                self._tracing.attempt_failed(attempt, exc)
            raise
        finally:
            self._active.pop(request.request_id, None)
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
            if attempt is not None and attempt.end_ns is None:
                attempt.end_ns = time.time_ns()  # the consumer stopped early


Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


class TracingMiddleware:
    """Pure ASGI: the request span around the app, current for everything the request runs
    (its tier attempts, its record's observers)."""

    def __init__(self, app: Any, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _UNTRACED:
            await self.app(scope, receive, send)
            return
        rt = self.tracing.start_request(scope)
        token = _current.set(rt)
        status: int | None = None

        async def traced_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, traced_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _current.reset(token)
            self.tracing.end_request(rt, status, error)
