"""/metrics after real requests (the real SmolLM2 tier escalating to a scripted, priced remote
tier), parsed with prometheus-client's own parser."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from localroute.backends.base import load_backend
from localroute.errors import InvalidRequestError
from localroute.routing.base import Tier
from localroute.server.app import create_app
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_metrics_after_real_requests() -> None:
    settings = local_settings([
        {"name": "small", "kind": "llama_cpp", "model": "smollm2-135m", "threshold": 1.0},  # always escalates
        {"name": "big", "kind": "openai", "model": "gpt-4o-mini", "base_url": "http://127.0.0.1:9/v1"},
    ], routing_log_path=None)
    small = load_backend(settings.tiers[0], settings)
    tiers = [Tier("small", small, 1.0), Tier("big", ScriptedBackend("big", "a frontier answer", [-0.2, -0.1],
                                                                    local=False)),
             Tier("broken", ScriptedBackend("broken", "", [], error=InvalidRequestError("no")))]
    with serve_app(create_app(settings, tiers=tiers)) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Say hi."}]
        client.chat.completions.create(model="localroute/cascade", messages=msgs, max_tokens=4, temperature=0)
        list(client.chat.completions.create(model="localroute/cascade", messages=msgs, max_tokens=4,
                                            temperature=0, stream=True))
        client.chat.completions.create(model="small", messages=msgs, max_tokens=4, temperature=0)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="broken", messages=msgs, max_tokens=4)
        resp = httpx.get(url.removesuffix("/v1") + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = _samples(resp.text)
    assert all(name.startswith("localroute_") for name in s)

    assert _value(s, "localroute_requests_total", policy="localroute/cascade", tier="big", outcome="ok") == 2
    assert _value(s, "localroute_requests_total", policy="small", tier="small", outcome="ok") == 1
    assert _value(s, "localroute_requests_total", tier="none", outcome="error") == 1
    assert _value(s, "localroute_escalations_total", from_tier="small", to_tier="big") == 2
    assert _value(s, "localroute_tokens_total", tier="small", type="input") > 0
    assert _value(s, "localroute_tokens_total", tier="big", type="output") == 2 * 2  # 2 tokens, 2 answers
    assert _value(s, "localroute_cost_usd_total", tier="small") > 0  # real CPU time of the real model
    # the scripted frontier reports 5 prompt + 2 completion tokens, priced at gpt-4o-mini's table price
    assert _value(s, "localroute_cost_usd_total", tier="big") == pytest.approx(2 * (5 * 0.15 + 2 * 0.60) / 1e6)
    assert _value(s, "localroute_counterfactual_cost_usd_total") > 0
    assert _value(s, "localroute_confidence_count", tier="small") == 3
    assert _value(s, "localroute_confidence_count", tier="big") == 2
    assert _value(s, "localroute_e2e_latency_seconds_count") == 4
    assert _value(s, "localroute_ttft_seconds_count", tier="big") == 2
    depth = {lab["state"] for lab, _ in s["localroute_queue_depth"] if lab["tier"] == "small"}
    assert depth == {"active", "waiting"}
    # the real engine's counters: 3 local answers (greedy, >= 1 token each) in at least as many steps
    assert _value(s, "localroute_engine_tokens_generated_total", tier="small") >= 3
    steps = _value(s, "localroute_engine_decode_row_steps_total", tier="small")
    assert steps >= 1
    assert _value(s, "localroute_engine_batched_rows_total", tier="small") >= steps
    assert _value(s, "localroute_engine_ubatches_total", tier="small") >= steps
    assert "localroute_gpu_utilization_ratio" not in s  # no GPU here: no samples, and no crash
