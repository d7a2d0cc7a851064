"""A remote self-hosted engine (a vLLM / llama-server fleet, OpenAI-compatible) as a NON-final
cascade tier: its logprobs are asked for on every call and feed the confidence, its answers are
priced by GPU-hour share, not list price, and no frontier budget applies to it. Both upstreams are
the real recording HTTP stand-in (tests/fault_upstream.py) on 127.0.0.1; the app is the real one,
built from settings as `localroute serve` builds it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from localroute.server.app import create_app
from localroute.settings import Settings
from tests.conftest import local_settings, serve_app
from tests.fault_upstream import Fault, FaultUpstream

GPU_HOUR_USD, GPUS, TOKENS_PER_S = 2.5, 2, 400.0
CHAT = {"model": "localroute/cascade", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def completion(logprob: float, text: str = "Paris is the capital.") -> dict[str, Any]:
    words = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
    return {"id": "chatcmpl-fleet", "object": "chat.completion", "created": int(time.time()), "model": "qwen2.5-7b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": w, "logprob": logprob, "bytes": list(w.encode()),
                                                   "top_logprobs": [{"token": w, "logprob": logprob},
                                                                    {"token": "x", "logprob": logprob - 2}]}
                                                  for w in words]}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": len(words), "total_tokens": 20 + len(words)}}


def ladder(fleet: FaultUpstream, frontier: FaultUpstream | None, **kw: Any) -> Settings:
    tiers: list[dict[str, Any]] = [
        {"name": "fleet", "kind": "openai", "model": "qwen2.5-7b", "base_url": fleet.url, "threshold": -0.5,
         "gpu_hour_usd": GPU_HOUR_USD, "gpus": GPUS, "tokens_per_s": TOKENS_PER_S}]
    if frontier is not None:
        tiers.append({"name": "frontier", "kind": "openai", "model": "gpt-4o-mini", "base_url": frontier.url,
                      "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6})
    return local_settings(tiers=tiers, budget_usd=1.0, **kw)  # a frontier budget: the fleet needs no list price


@pytest.fixture
def upstreams() -> Iterator[tuple[FaultUpstream, FaultUpstream]]:
    with FaultUpstream() as fleet, FaultUpstream() as frontier:
        yield fleet, frontier


def test_a_confident_fleet_answers_priced_by_its_gpu_hours(upstreams: tuple[FaultUpstream, FaultUpstream]) -> None:
    fleet, frontier = upstreams
    fleet.script(Fault(completion=completion(-0.05)))
    with serve_app(create_app(ladder(fleet, frontier))) as url:
        r = httpx.post(f"{url}/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["localroute"]
    assert r.headers["x-localroute-tier"] == "fleet" and info["escalated"] is False
    assert info["confidence"] == pytest.approx(-0.05)  # the fleet's own logprobs, as the cascade computes it
    assert frontier.requests == []
    # logprobs were asked for on the client's behalf, and are not in its answer
    sent = fleet.requests[0]["json"]
    assert sent["logprobs"] is True and sent["model"] == "qwen2.5-7b" and "top_logprobs" not in sent
    assert body["choices"][0]["logprobs"] is None
    assert body["choices"][0]["message"]["content"] == "Paris is the capital."
    # GPU-hour share: 4 completion tokens / 400 tok/s on a 2-GPU replica at $2.5 per GPU-hour
    cost = info["cost_inputs"][0]
    assert cost["method"] == "self_hosted_gpu" and cost["inputs"]["gpu_s_method"] == "measured_throughput"
    expected = 4 / TOKENS_PER_S * GPUS / 3600 * GPU_HOUR_USD
    assert cost["cost_usd"] == pytest.approx(expected) and info["cost_usd"] == pytest.approx(expected)
    assert cost["inputs"]["gpu_s"] == pytest.approx(4 / TOKENS_PER_S * GPUS)
    # the counterfactual is the list-priced frontier's, never the fleet's
    assert info["counterfactual_inputs"]["model"] == "gpt-4o-mini"
    assert info["counterfactual_cost_usd"] == pytest.approx((20 * 0.15 + 4 * 0.6) / 1e6)


def test_an_unsure_fleet_escalates_and_its_gpu_time_is_still_billed(
        upstreams: tuple[FaultUpstream, FaultUpstream]) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed: pip install 'localroute[otel]'")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    fleet, frontier = upstreams
    fleet.script(Fault(completion=completion(-3.0, "Maybe Lyon, or Paris?")))
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with serve_app(create_app(ladder(fleet, frontier), tracer_provider=provider)) as url:
        r = httpx.post(f"{url}/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 1}, timeout=30)
    # one trace: each upstream was sent its own attempt span as parent
    spans = {s.name: s for s in exporter.get_finished_spans()}
    fleet_span, frontier_span = spans["chat qwen2.5-7b"], spans["chat gpt-4o-mini"]
    for up, span in ((fleet, fleet_span), (frontier, frontier_span)):
        _, trace_id, parent, _ = up.requests[0]["headers"]["traceparent"].split("-")
        assert (trace_id, parent) == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
    assert fleet_span.attributes is not None and fleet_span.attributes["localroute.accepted"] is False
    assert fleet_span.attributes["localroute.cost_method"] == "self_hosted_gpu"
    assert r.status_code == 200, r.text
    info = r.json()["localroute"]
    assert [(a["tier"], a["accepted"]) for a in info["attempts"]] == [("fleet", False), ("frontier", True)]
    assert info["attempts"][0]["confidence"] == pytest.approx(-3.0)
    assert [c["method"] for c in info["cost_inputs"]] == ["self_hosted_gpu", "frontier_usage"]
    assert info["cost_inputs"][0]["cost_usd"] == pytest.approx(4 / TOKENS_PER_S * GPUS / 3600 * GPU_HOUR_USD)
    assert len(frontier.requests) == 1 and frontier.requests[0]["json"]["top_logprobs"] == 1
    assert r.json()["choices"][0]["logprobs"]["content"]  # the client asked: the frontier's logprobs pass


def test_client_logprobs_cut_to_what_it_asked(upstreams: tuple[FaultUpstream, FaultUpstream]) -> None:
    """An aggregator that reads top alternatives (mean_margin: 2) makes the cascade ask the fleet
    for them; a client that asked for logprobs without alternatives gets the chosen tokens' only."""
    fleet, frontier = upstreams
    fleet.script(Fault(completion=completion(-0.05)), Fault(completion=completion(-0.05)))
    settings = ladder(fleet, frontier, confidence_aggregator="mean_margin")
    settings.tiers[0] = settings.tiers[0].model_copy(update={"threshold": 1.0})  # margin 2 nats: accepted
    with serve_app(create_app(settings)) as url:
        r = httpx.post(f"{url}/chat/completions", json={**CHAT, "logprobs": True}, timeout=30)
        r2 = httpx.post(f"{url}/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}, timeout=30)
    assert r.json()["localroute"]["tier"] == "fleet"
    assert r.json()["localroute"]["confidence"] == pytest.approx(2.0)
    assert fleet.requests[0]["json"]["top_logprobs"] == 2 and fleet.requests[0]["json"]["logprobs"] is True
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [t["logprob"] for t in content] == [-0.05] * 4 and all(t["top_logprobs"] == [] for t in content)
    assert all(len(t["top_logprobs"]) == 2 for t in r2.json()["choices"][0]["logprobs"]["content"])


def test_streamed_client_gets_the_buffered_fleet_answer(upstreams: tuple[FaultUpstream, FaultUpstream]) -> None:
    fleet, frontier = upstreams
    fleet.script(Fault(completion=completion(-0.05)))
    with serve_app(create_app(ladder(fleet, frontier))) as url, \
            httpx.stream("POST", f"{url}/chat/completions", json={**CHAT, "stream": True}, timeout=30) as r:
        text = r.read().decode()
    assert r.status_code == 200 and "Paris is the capital." in text and text.rstrip().endswith("[DONE]")
    sent = fleet.requests[0]["json"]
    assert sent["logprobs"] is True and sent.get("stream") is False  # the non-final call is buffered
    assert frontier.requests == []


def test_as_the_last_tier_it_is_not_asked_for_logprobs() -> None:
    with FaultUpstream() as fleet:
        with serve_app(create_app(ladder(fleet, None))) as url:
            r = httpx.post(f"{url}/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200
        assert "logprobs" not in fleet.requests[0]["json"]
        assert r.json()["localroute"]["cost_inputs"][0]["method"] == "self_hosted_gpu"


def test_without_a_measured_rate_it_is_priced_by_wall_time_share() -> None:
    with FaultUpstream(Fault(completion=completion(-0.05), delay_s=0.2)) as fleet:
        settings = ladder(fleet, None)
        settings.tiers[0] = settings.tiers[0].model_copy(update={"tokens_per_s": None, "gpu_share": 0.25})
        with serve_app(create_app(settings)) as url:
            r = httpx.post(f"{url}/chat/completions", json=CHAT, timeout=30)
    cost = r.json()["localroute"]["cost_inputs"][0]
    assert cost["inputs"]["gpu_s_method"] == "wall_time_share"
    latency = cost["inputs"]["latency_s"]
    assert latency >= 0.2
    assert cost["cost_usd"] == pytest.approx(latency * 0.25 * GPUS / 3600 * GPU_HOUR_USD, rel=1e-3)
