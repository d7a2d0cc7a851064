"""Per-attempt cost: arithmetic on known usage and telemetry windows (scripted backends), and the
real thing: a cascade of the real SmolLM2 tier and a real OpenAI-compatible upstream, priced on
streamed and non-streamed answers read with the official openai client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from openai import OpenAI

from localroute.monitoring.cost import (
    CostAccountant,
    cost_headers,
    cpu_cost_usd,
    energy_cost_usd,
    gpu_time_cost_usd,
)
from localroute.monitoring.pricing import load_price_table
from localroute.monitoring.telemetry import Nvml, Sample, Telemetry
from localroute.routing.base import Decision, Tier, TierAttempt
from localroute.server.app import create_app
from localroute.settings import Settings
from localroute.types import Generation
from tests.conftest import local_settings, serve_app
from tests.fakes import BrokenNvml, ScriptedBackend


def telemetry_with(samples: list[Sample]) -> Telemetry:
    tel = Telemetry(interval_s=1.0, nvml=Nvml(BrokenNvml()))
    tel._samples.extend(samples)
    return tel


SETTINGS: dict[str, Any] = {"tiers": [
    {"name": "local", "kind": "llama_cpp", "model": "smollm2-135m"},
    {"name": "frontier", "kind": "openai", "model": "gpt-4o-mini", "base_url": "http://127.0.0.1:9/v1"},
]}


def test_unit_helpers() -> None:
    assert cpu_cost_usd(3600, 0.05) == pytest.approx(0.05)
    assert gpu_time_cost_usd(1800, 2.0) == pytest.approx(1.0)
    assert energy_cost_usd(3.6e6, 0.15) == pytest.approx(0.15)


def test_escalated_request_pays_both_attempts() -> None:
    settings = Settings(**SETTINGS, usd_per_core_hour=0.045)
    tiers = [Tier("local", ScriptedBackend("local"), -1.0),
             Tier("frontier", ScriptedBackend("frontier", local=False))]
    # process CPU seconds at times 999..1004; two sequences decoding until 1002
    tel = telemetry_with([Sample(999, 0.0, active_cpu=2, active_gpu=0), Sample(1001, 2.0, active_cpu=2, active_gpu=0),
                          Sample(1002, 3.0, active_cpu=1, active_gpu=0), Sample(1004, 3.5, active_cpu=0, active_gpu=0)])
    acc = CostAccountant(settings, tiers, tel)
    decision = Decision("localroute/cascade", "mean_logprob", [
        TierAttempt("local", -2.0, -1.0, False, 10, 5, latency_s=2.0),
        TierAttempt("frontier", None, None, True, 12, 6, latency_s=1.0),
    ], answered_by="frontier")
    usage = {"prompt_tokens": 12, "completion_tokens": 6, "prompt_tokens_details": {"cached_tokens": 4}}
    gen = Generation("hi", [], "stop", 12, 6, latency_s=1.0, extra={"usage": usage})
    cost = acc.price(decision, gen, started=1000.0, ended=1003.0)

    local, frontier = cost.attempts
    # window [1000, 1002]: CPU 1.0 -> 3.0 = 2.0 s, shared by 2 sequences -> 1.0 CPU-second
    assert local.method == "local_cpu"
    assert local.inputs["cpu_s"] == pytest.approx(1.0)
    assert local.inputs["mean_batched_sequences"] == pytest.approx(2.0)
    assert local.cost_usd == pytest.approx(1.0 / 3600 * 0.045)
    # 8 fresh + 4 cached prompt tokens at gpt-4o-mini's shipped prices
    assert frontier.method == "frontier_usage"
    assert frontier.inputs["usage_source"] == "provider_usage"
    assert frontier.cost_usd == pytest.approx((8 * 0.15 + 4 * 0.075 + 6 * 0.60) / 1e6)
    assert cost.cost_usd == pytest.approx(local.cost_usd + frontier.cost_usd)
    # the top tier answered: the counterfactual is its own bill, not an estimate
    assert cost.counterfactual_cost_usd == pytest.approx(frontier.cost_usd)
    d = cost.as_dict()
    assert d["counterfactual_is_estimate"] is False
    assert [a["tier"] for a in d["cost_inputs"]] == ["local", "frontier"]
    assert float(cost_headers(cost)["x-localroute-cost-usd"]) == pytest.approx(cost.cost_usd, abs=1e-9)


def cpu_s_of_a_local_answer(acc: CostAccountant, started: float) -> float:
    """Price a local answer that ran from `started` until now: its CPU seconds."""
    ended = time.perf_counter()
    decision = Decision("p", "s", [TierAttempt("local", -0.1, -1.0, True, 5, 5, latency_s=ended - started)],
                        answered_by="local")
    return float(acc.price(decision, None, started, ended).attempts[0].inputs["cpu_s"])


def test_pricing_many_answers_keeps_a_long_requests_window_start() -> None:
    """Each priced answer used to keep its end reading in the history: enough of them during a long
    request pushed the reading before its start out, and it was priced from a later one, too low."""
    cpu = [0.0]
    tel = Telemetry(interval_s=3600, nvml=Nvml(BrokenNvml()), history=8, cpu_energy=lambda: None,
                    cpu_clock=lambda: cpu[0])
    acc = CostAccountant(Settings(**SETTINGS), [Tier("local", ScriptedBackend("local"), -1.0)], tel)
    price = partial(cpu_s_of_a_local_answer, acc)

    started = tel.sample(periodic=True).t  # the long request starts at a kept reading: CPU 0.0
    for _ in range(20):  # short answers finish meanwhile, 0.5 CPU-s each
        cpu[0] += 0.5
        price(time.perf_counter())
    cpu[0] += 0.5
    assert price(started) == pytest.approx(10.5, rel=0.1)  # everything since its start (it read ~3.5)
    assert len(tel._samples) == 2  # the periodic reading and the newest priced one


def test_back_to_back_answers_start_their_windows_at_the_previous_answers_reading() -> None:
    """The newest priced reading stays in the history until the next periodic sample: an answer
    right after another is priced from it, not from a periodic sample before an idle spell."""
    cpu = [0.0]
    tel = Telemetry(interval_s=3600, nvml=Nvml(BrokenNvml()), cpu_energy=lambda: None, cpu_clock=lambda: cpu[0])
    acc = CostAccountant(Settings(**SETTINGS), [Tier("local", ScriptedBackend("local"), -1.0)], tel)
    price = partial(cpu_s_of_a_local_answer, acc)

    tel.sample(periodic=True)
    time.sleep(0.05)  # idle
    first = time.perf_counter()
    cpu[0] += 1.0
    price(first)
    second = time.perf_counter()  # the next answer starts as the first is priced
    time.sleep(0.1)
    cpu[0] += 0.2
    assert price(second) == pytest.approx(0.2, rel=0.1)  # from the periodic sample alone: ~0.4


def test_local_answer_counterfactual_is_a_labelled_estimate() -> None:
    settings = Settings(**SETTINGS)
    tiers = [Tier("local", ScriptedBackend("local"), -1.0),
             Tier("frontier", ScriptedBackend("frontier", local=False))]
    acc = CostAccountant(settings, tiers, telemetry_with([Sample(0, 0.0, active_cpu=1, active_gpu=0)]))
    decision = Decision("p", "mean_logprob", [TierAttempt("local", -0.2, -1.0, True, 100, 50, latency_s=0.5)],
                        answered_by="local")
    cost = acc.price(decision, Generation("x", [], "stop", 100, 50), 10.0, 10.5)
    assert cost.counterfactual_cost_usd == pytest.approx((100 * 0.15 + 50 * 0.60) / 1e6)
    assert cost.counterfactual_inputs["estimate"] is True
    assert cost.counterfactual_inputs["model"] == "gpt-4o-mini"
    assert cost.cost_usd < cost.counterfactual_cost_usd


def test_all_local_ladder_uses_frontier_model_setting_for_counterfactual() -> None:
    settings = Settings(tiers=[{"name": "local", "kind": "llama_cpp", "model": "m"}], frontier_model="gpt-4o")
    acc = CostAccountant(settings, [Tier("local", ScriptedBackend("local"))], None)
    decision = Decision("p", "s", [TierAttempt("local", -0.1, None, True, 1000, 1000)], answered_by="local")
    cost = acc.price(decision, None, 0.0, 0.0)
    assert cost.attempts[0].method == "unpriced"  # no telemetry: said so, not a silent zero
    assert cost.counterfactual_cost_usd == pytest.approx((1000 * 2.50 + 1000 * 10.00) / 1e6)


def test_gpu_attempt_energy_and_gpu_seconds_are_shared_by_the_batch() -> None:
    settings = Settings(tiers=[{"name": "gpu", "kind": "vllm", "model": "m"}], usd_per_gpu_hour=2.0, usd_per_kwh=0.15)
    tel = telemetry_with([Sample(999, 0.0, gpu_energy_j=0.0, active_cpu=0, active_gpu=2),
                          Sample(1001, 0.0, gpu_energy_j=200.0, active_cpu=0, active_gpu=2),
                          Sample(1002, 0.0, gpu_energy_j=300.0, active_cpu=0, active_gpu=2)])
    acc = CostAccountant(settings, [Tier("gpu", ScriptedBackend("gpu", uses_gpu=True))], tel)
    decision = Decision("p", "s", [TierAttempt("gpu", -0.1, None, True, 5, 5, latency_s=2.0)], answered_by="gpu")
    a = acc.price(decision, None, 1000.0, 1002.0).attempts[0]
    assert a.method == "local_gpu"
    assert a.energy_j == pytest.approx(100.0)  # (300 - 100) J / 2 sequences
    assert a.inputs["gpu_s"] == pytest.approx(1.0)
    assert a.cost_usd == pytest.approx(1.0 / 3600 * 2.0 + 100.0 / 3.6e6 * 0.15)


def test_unpriced_frontier_says_why() -> None:
    settings = Settings(tiers=[{"name": "f", "kind": "openai", "model": "acme-secret-model", "base_url": "http://x"}],
                        frontier_model="acme-secret-model")
    acc = CostAccountant(settings, [Tier("f", ScriptedBackend("f", local=False))], None, load_price_table())
    decision = Decision("p", "s", [TierAttempt("f", None, None, True, 5, 5)], answered_by="f")
    cost = acc.price(decision, None, 0.0, 0.0)
    assert cost.attempts[0].method == "unpriced" and "price" in cost.attempts[0].inputs["reason"]
    assert cost.counterfactual_cost_usd is None


# ---------- the real thing ----------

IN_PRICE, OUT_PRICE = 1.0, 2.0  # USD per million tokens for the "frontier" upstream


@pytest.fixture(scope="module")
def cascade_url() -> Iterator[str]:
    upstream = create_app(local_settings([{"name": "upstream", "kind": "llama_cpp", "model": "smollm2-135m"}],
                                         routing_log_path=None))
    with serve_app(upstream) as up_url:
        settings = local_settings([
            # mean logprob is never above 1.0: the local tier always escalates
            {"name": "small", "kind": "llama_cpp", "model": "smollm2-135m", "threshold": 1.0},
            {"name": "frontier", "kind": "openai", "model": "upstream", "base_url": up_url,
             "input_usd_per_mtok": IN_PRICE, "output_usd_per_mtok": OUT_PRICE},
        ], routing_log_path=None, usd_per_core_hour=1.0)
        with serve_app(create_app(settings)) as url:
            yield url


MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_streamed_request_is_priced_from_provider_usage(cascade_url: str) -> None:
    client = OpenAI(base_url=cascade_url, api_key="unused")
    chunks = list(client.chat.completions.create(
        model="localroute/cascade", messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    info = next(c.model_extra["localroute"] for c in chunks if c.model_extra and "localroute" in c.model_extra)
    local, frontier = info["cost_inputs"]
    assert local["tier"] == "small" and local["method"] == "local_cpu"
    assert local["cost_usd"] > 0 and local["inputs"]["cpu_s"] > 0  # the rejected attempt still costs
    assert frontier["method"] == "frontier_usage"
    assert frontier["inputs"]["usage_source"] == "provider_usage"
    expected = (usage.prompt_tokens * IN_PRICE + usage.completion_tokens * OUT_PRICE) / 1e6
    assert frontier["cost_usd"] == pytest.approx(expected)
    assert info["cost_usd"] == pytest.approx(local["cost_usd"] + frontier["cost_usd"])
    assert info["counterfactual_cost_usd"] == pytest.approx(expected)
    assert info["counterfactual_is_estimate"] is False


def test_non_streamed_request_carries_cost_header_and_fields(cascade_url: str) -> None:
    client = OpenAI(base_url=cascade_url, api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="localroute/cascade", messages=MESSAGES, max_tokens=6, temperature=0)
    info = raw.parse().model_extra["localroute"]
    assert float(raw.headers["x-localroute-cost-usd"]) == pytest.approx(info["cost_usd"], abs=1e-9)
    assert info["cost_usd"] > 0
    assert [a["method"] for a in info["cost_inputs"]] == ["local_cpu", "frontier_usage"]


def test_local_answer_cpu_cost_and_estimated_counterfactual(cascade_url: str) -> None:
    client = OpenAI(base_url=cascade_url, api_key="unused")
    raw = client.completions.with_raw_response.create(model="small", prompt="Once upon a time", max_tokens=6,
                                                      temperature=0)
    body = raw.parse()
    info = body.model_extra["localroute"]
    (attempt,) = info["cost_inputs"]
    assert attempt["method"] == "local_cpu"
    assert attempt["inputs"]["cpu_s"] > 0 and attempt["inputs"]["usd_per_core_hour"] == 1.0
    assert attempt["cost_usd"] == pytest.approx(attempt["inputs"]["cpu_s"] / 3600 * 1.0, rel=1e-3)
    assert info["counterfactual_is_estimate"] is True
    u = body.usage
    assert info["counterfactual_cost_usd"] == pytest.approx(
        (u.prompt_tokens * IN_PRICE + u.completion_tokens * OUT_PRICE) / 1e6)


def test_gpu_detection_from_health() -> None:
    settings = Settings(tiers=[{"name": "t", "kind": "transformers", "model": "m"}])
    for device, kind in (("cuda:0", "local_gpu"), ("cpu", "local_cpu")):
        acc = CostAccountant(settings, [Tier("t", ScriptedBackend("t", kind="transformers", device=device))], None)
        assert acc.tier_kind["t"] == kind
