"""Traces through the real app served by uvicorn on 127.0.0.1: spans caught by the SDK's in-memory
exporter, and once through the real OTLP/HTTP exporter into a receiver on 127.0.0.1. The remote
tier is the recording frontier stand-in (tests/fault_upstream.py), so what it was sent, the
`traceparent` header included, is what went over the wire."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.settings import Settings
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed: pip install 'localroute[otel]'")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    yield provider, exp
    provider.shutdown()


def cascade_settings(upstream: FaultUpstream, threshold: float, **kw: Any) -> Settings:
    return local_settings(tiers=[
        {"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m", "threshold": threshold},
        {"name": "frontier", "kind": "openai", "model": "gpt-4o-mini", "base_url": upstream.url,
         "api_key": "sk-test-frontier", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6},
    ], n_parallel=2, **kw)  # the engine in its own process, as `serve` runs it


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


@pytest.mark.slow
def test_escalated_request_is_one_trace_from_the_caller_to_the_frontier(
        exporter: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """The real SmolLM2 tier (llama.cpp) refuses (threshold 0: a mean logprob is never >= 0), the
    frontier stand-in answers: one request span under the caller's traceparent, an INTERNAL span
    for the local attempt and a CLIENT span for the frontier's, whose id the frontier was sent."""
    provider, exp = exporter
    with FaultUpstream() as up:
        app = create_app(cascade_settings(up, threshold=0.0), tracer_provider=provider)
        with serve_app(app) as url:
            r = httpx.post(f"{url}/chat/completions", timeout=120, headers={"traceparent": TRACEPARENT},
                           json={"model": "localroute/cascade", "max_tokens": 6, "temperature": 0,
                                 "seed": 7, "messages": [{"role": "user", "content": "Name a colour."}]})
            assert r.status_code == 200, r.text
            assert r.headers["x-localroute-escalated"] == "true"
            info = r.json()["localroute"]
        sent = up.requests[-1]["headers"]
    spans = by_name(exp.get_finished_spans())
    assert set(spans) == {"POST /v1/chat/completions", "chat SmolLM2-135M-Instruct.Q4_1.gguf", "chat gpt-4o-mini"}, list(spans)
    root, local, remote = (spans["POST /v1/chat/completions"], spans["chat SmolLM2-135M-Instruct.Q4_1.gguf"],
                           spans["chat gpt-4o-mini"])
    # the caller's trace: same trace id everywhere, the request span's parent is the caller's span
    for s in (root, local, remote):
        assert hexid(s.context.trace_id, 32) == CALLER_TRACE
    assert root.parent is not None and hexid(root.parent.span_id, 16) == CALLER_SPAN and root.parent.is_remote
    assert local.parent.span_id == root.context.span_id and remote.parent.span_id == root.context.span_id
    assert root.kind == SpanKind.SERVER and local.kind == SpanKind.INTERNAL and remote.kind == SpanKind.CLIENT
    # the frontier got the trace: its parent is the frontier attempt's span
    version, trace_id, parent_id, flags = sent["traceparent"].split("-")
    assert (version, trace_id, parent_id, flags) == ("00", CALLER_TRACE, hexid(remote.context.span_id, 16), "01")
    # GenAI semantic conventions and the routing outcome on the request span
    a = root.attributes
    assert a is not None
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "localroute/cascade"
    assert a["gen_ai.request.max_tokens"] == 6 and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.request.seed"] == 7 and a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert a["http.response.status_code"] == 200 and a["http.request.method"] == "POST"
    assert a["localroute.tier"] == "frontier" and a["localroute.decision"] == "escalated"
    assert a["localroute.escalated"] is True and a["localroute.attempts"] == 2
    assert a["localroute.cost_usd"] == pytest.approx(info["cost_usd"])
    assert a["localroute.counterfactual_cost_usd"] == pytest.approx(info["counterfactual_cost_usd"])
    assert a["localroute.request_id"] == r.json()["id"]
    # each attempt: its model, usage, the cascade's verdict on it, its cost
    la, ra = local.attributes, remote.attributes
    assert la is not None and ra is not None
    assert la["gen_ai.provider.name"] == "llama_cpp" and ra["gen_ai.provider.name"] == "openai"
    assert la["localroute.accepted"] is False and ra["localroute.accepted"] is True
    assert la["localroute.threshold"] == 0.0
    assert la["localroute.confidence"] == pytest.approx(info["attempts"][0]["confidence"])
    assert la["gen_ai.usage.output_tokens"] == info["attempts"][0]["completion_tokens"]
    assert ra["server.address"] == "127.0.0.1" and ra["server.port"] == up.port
    assert ra["gen_ai.response.id"] == "chatcmpl-fault"
    assert la["localroute.cost_method"] == "local_cpu" and ra["localroute.cost_method"] == "frontier_usage"
    assert ra["localroute.cost_usd"] == pytest.approx(info["cost_inputs"][1]["cost_usd"])
    # the attempts ran one after the other, inside the request
    assert root.start_time <= local.start_time < local.end_time <= remote.start_time < remote.end_time
    assert remote.end_time <= root.end_time
    # no prompt or answer text on any span
    texts = [str(v) for s in spans.values() for v in (s.attributes or {}).values()]
    assert not any("colour" in t or "Paris" in t for t in texts)


def scripted_app(provider: TracerProvider, upstream: FaultUpstream, **kw: Any) -> Any:
    """The real app around a scripted local tier (router logic only) and the real HTTP frontier backend."""
    from localroute.backends.openai_http import OpenAIHTTPBackend

    settings = local_settings(**kw)
    tiers = [Tier("local", ScriptedBackend("local", logprobs=-3.0), threshold=-1.0),
             Tier("frontier", OpenAIHTTPBackend("frontier", upstream.url, "gpt-4o-mini", input_usd_per_mtok=1.0,
                                                output_usd_per_mtok=2.0))]
    return create_app(settings, tiers=tiers, tracer_provider=provider)


def test_streamed_escalation_and_a_new_trace_without_traceparent(
        exporter: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exp = exporter
    with FaultUpstream() as up, serve_app(scripted_app(provider, up)) as url:
        with httpx.stream("POST", f"{url}/chat/completions", timeout=30,
                          json={"model": "localroute/cascade", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as r:
            body = r.read().decode()
        assert r.status_code == 200 and "[DONE]" in body
        sent = up.requests[-1]["headers"]["traceparent"]
    spans = by_name(exp.get_finished_spans())
    root, remote = spans["POST /v1/chat/completions"], spans["chat gpt-4o-mini"]
    assert root.parent is None  # no caller trace: a new one
    assert sent.split("-")[1] == hexid(root.context.trace_id, 32)
    assert sent.split("-")[2] == hexid(remote.context.span_id, 16)
    assert root.attributes is not None and root.attributes["localroute.stream"] is True
    assert root.attributes["localroute.decision"] == "escalated"
    assert remote.attributes is not None and remote.attributes["localroute.accepted"] is True
    assert remote.attributes["gen_ai.response.finish_reasons"] == ("stop",)


def test_other_apis_are_traced_through_the_same_router(exporter: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exp = exporter
    with FaultUpstream() as up, serve_app(scripted_app(provider, up)) as url:
        r = httpx.post(f"{url}/messages", timeout=30, headers={"traceparent": TRACEPARENT},
                       json={"model": "localroute/cascade", "max_tokens": 16,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert up.requests[-1]["headers"]["traceparent"].split("-")[1] == CALLER_TRACE
    root = by_name(exp.get_finished_spans())["POST /v1/messages"]
    assert root.attributes is not None and root.attributes["localroute.endpoint"] == "messages"
    assert root.attributes["localroute.decision"] == "escalated" and root.attributes["localroute.tier"] == "frontier"
    assert hexid(root.context.trace_id, 32) == CALLER_TRACE


def test_refused_and_failed_requests_are_traced(exporter: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exp = exporter
    with FaultUpstream(Fault("status", status=500)) as up, \
            serve_app(scripted_app(provider, up, escalation_failure_policy="fail", frontier_max_retries=0)) as url:
        bad = httpx.post(f"{url}/chat/completions", json={"model": "nope", "messages": []}, timeout=30)
        failed = httpx.post(f"{url}/chat/completions", timeout=30,
                            json={"model": "localroute/cascade", "messages": [{"role": "user", "content": "hi"}]})
        assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 200
    assert bad.status_code == 400 and failed.status_code == 502
    roots = [s for s in exp.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.attributes["http.response.status_code"] for s in roots] == [400, 502]  # type: ignore[index]
    assert roots[0].attributes["localroute.decision"] == "rejected"  # type: ignore[index]
    assert roots[1].attributes["localroute.decision"] == "failed"  # type: ignore[index]
    assert roots[1].status.is_ok is False and roots[0].status.is_ok
    remote = by_name(exp.get_finished_spans())["chat gpt-4o-mini"]
    assert remote.attributes is not None and remote.attributes["error.type"] == "upstream_unavailable"
    assert not any(s.name.startswith("GET /health") for s in exp.get_finished_spans())  # probes not traced


def test_off_by_default_nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    from localroute.monitoring.tracing import TracedBackend, TracingMiddleware, tracing_configured

    settings = local_settings()
    assert not tracing_configured(settings)
    app = create_app(settings, tiers=[Tier("local", ScriptedBackend("local"))])
    assert not any(m.cls is TracingMiddleware for m in app.user_middleware)
    with serve_app(app) as url:
        assert httpx.post(f"{url}/chat/completions", timeout=30,
                          json={"model": "local", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        assert not isinstance(app.state.service.tiers[0].backend, TracedBackend)
    # the standard variables switch it on, OTEL_SDK_DISABLED off again
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing_configured(settings)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing_configured(settings)


def test_tracing_off_imports_no_opentelemetry_sdk() -> None:
    """(FastAPI itself imports the opentelemetry API; the SDK and the exporter stay out.)"""
    import subprocess

    code = ("import sys, localroute.server.app, localroute.monitoring.tracing;"
            "print(any(m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


class _Receiver(BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    posts: list[tuple[str, dict[str, str], bytes]] = []
    handler = type("Receiver", (_Receiver,), {"posts": posts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posts
    finally:
        server.shutdown()
        server.server_close()


def test_spans_reach_a_real_otlp_http_receiver(
        otlp_receiver: tuple[str, list[tuple[str, dict[str, str], bytes]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings `otlp_endpoint` -> the SDK's OTLP/HTTP protobuf exporter -> POST <url>/v1/traces,
    flushed when the app shuts down; the body decodes as an ExportTraceServiceRequest."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint, posts = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=team-a")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "localroute-replica-a")
    with FaultUpstream() as up:
        from localroute.backends.openai_http import OpenAIHTTPBackend

        settings = local_settings(otlp_endpoint=endpoint)
        tiers = [Tier("frontier", OpenAIHTTPBackend("frontier", up.url, "gpt-4o-mini"))]
        with serve_app(create_app(settings, tiers=tiers)) as url:
            r = httpx.post(f"{url}/chat/completions", timeout=30, headers={"traceparent": TRACEPARENT},
                           json={"model": "frontier", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
        assert up.requests[-1]["headers"]["traceparent"].split("-")[1] == CALLER_TRACE
    assert posts, "nothing was exported"
    assert {p for p, _, _ in posts} == {"/v1/traces"}
    assert all(h["content-type"] == "application/x-protobuf" and h["x-tenant"] == "team-a" for _, h, _ in posts)
    spans, resources = [], []
    for _, _, body in posts:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            resources.append({kv.key: kv.value.string_value for kv in rs.resource.attributes})
            spans += [s for ss in rs.scope_spans for s in ss.spans]
    assert {s.name for s in spans} == {"POST /v1/chat/completions", "chat gpt-4o-mini"}
    assert {s.trace_id.hex() for s in spans} == {CALLER_TRACE}
    assert all(r["service.name"] == "localroute-replica-a" for r in resources)
    root = next(s for s in spans if s.name.startswith("POST"))
    attrs = {kv.key: kv.value for kv in root.attributes}
    assert attrs["localroute.tier"].string_value == "frontier"
    assert attrs["gen_ai.request.model"].string_value == "frontier"


def test_an_anthropic_tier_gets_the_trace_too(exporter: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """The Anthropic Messages tier is the same HTTP client underneath: its call carries the trace."""
    provider, exp = exporter
    answer = {"id": "msg_upstream", "type": "message", "role": "assistant", "model": "claude-test-1",
              "content": [{"type": "text", "text": "Hello."}], "stop_reason": "end_turn", "stop_sequence": None,
              "usage": {"input_tokens": 12, "output_tokens": 2}}
    with FaultUpstream(Fault(completion=answer)) as up:
        settings = local_settings(tiers=[{"name": "claude", "kind": "anthropic", "model": "claude-test",
                                          "base_url": up.url, "api_key": "sk-ant-test"}])
        with serve_app(create_app(settings, tracer_provider=provider)) as url:
            r = httpx.post(f"{url}/chat/completions", timeout=30, headers={"traceparent": TRACEPARENT},
                           json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        sent = up.requests[-1]
    span = by_name(exp.get_finished_spans())["chat claude-test"]
    assert sent["path"] == "/v1/messages" and span.kind == SpanKind.CLIENT
    assert sent["headers"]["traceparent"] == f"00-{CALLER_TRACE}-{hexid(span.context.span_id, 16)}-01"
    assert span.attributes is not None and span.attributes["gen_ai.provider.name"] == "anthropic"
    assert span.attributes["gen_ai.response.model"] == "claude-test-1"
    assert span.attributes["gen_ai.usage.output_tokens"] == 2
