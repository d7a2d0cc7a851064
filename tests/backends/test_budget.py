"""Frontier spend caps: atomic worst-case reservations, reconciliation with the provider's usage,
bounded overshoot under 50 concurrent escalations, per-key caps, degrade-or-429 policy."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest

from localroute.backends.budget import BudgetExceededError, SpendBudget, SpendStore
from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.backends.resilience import CircuitBreaker, Deadlines, RetryPolicy
from localroute.errors import ConfigError, UpstreamError
from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.server.auth import current_key_id
from localroute.service import attach_budget
from localroute.settings import Settings
from localroute.types import GenerationRequest, SamplingParams
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream, fault_upstream

PROMPT = "What is the capital of France?"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_reserve_settle_and_reject() -> None:
    b = SpendBudget(cap_usd=1.0)
    r1 = b.reserve(0.6)
    with pytest.raises(BudgetExceededError) as info:
        b.reserve(0.5)  # 0.6 held + 0.5 > 1.0
    assert info.value.status_code == 429 and info.value.code == "budget_exceeded"
    assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1
    r1.settle(0.2)
    r1.settle(0.9)  # settling twice changes nothing
    assert b.spent_usd() == pytest.approx(0.2) and b.reserved_usd() == 0
    b.reserve(0.5).settle(0.5)
    assert b.spent_usd() == pytest.approx(0.7)


def test_per_key_cap_is_separate_from_the_global_one() -> None:
    b = SpendBudget(cap_usd=10.0, per_key_usd=1.0)
    b.reserve(0.9, key_id="a").settle(0.9)
    with pytest.raises(BudgetExceededError) as info:
        b.reserve(0.2, key_id="a")
    assert "API key" in info.value.message
    b.reserve(0.9, key_id="b").settle(0.9)
    b.reserve(0.5).settle(0.5)  # no key: only the global cap applies
    assert b.spent_usd("a") == pytest.approx(0.9) and b.spent_usd() == pytest.approx(2.3)


def test_period_rollover_resets_spend() -> None:
    clock = Clock(1_800_000_000.0)  # some UTC instant
    b = SpendBudget(cap_usd=1.0, period="hour", clock=clock)
    held = b.reserve(0.8)
    clock.t += 3600
    held.settle(0.8)  # belongs to the closed period
    assert b.spent_usd() == 0.0
    b.reserve(1.0).settle(1.0)
    with pytest.raises(BudgetExceededError):
        b.reserve(0.01)


def _backend(url: str) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(
        "frontier", url, "gpt-test", deadlines=Deadlines(1.0, 5.0, 5.0, 20.0),
        retry=RetryPolicy(max_retries=0, rng=random.Random(0)), breaker=CircuitBreaker("f", 1000),
        input_usd_per_mtok=1e6, output_usd_per_mtok=1e6,  # one dollar a token keeps the sums readable
    )


def _request(max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": PROMPT},), params=SamplingParams(max_tokens=max_tokens))


def test_fifty_concurrent_escalations_overshoot_at_most_one_reservation() -> None:
    backend = _backend("")
    worst = backend._worst_cost_usd(_request())
    cap = 5.5 * worst

    async def case(up: FaultUpstream) -> tuple[int, int, SpendBudget]:
        b = _backend(up.url)
        b.budget = SpendBudget(cap_usd=cap)

        async def one() -> str:
            try:
                await b.generate(_request())
                return "ok"
            except BudgetExceededError:
                return "rejected"

        try:
            results: list[str] = []
            for _ in range(3):  # waves: settled reservations free room for later calls
                results += await asyncio.gather(*(one() for _ in range(50)))
        finally:
            await b.aclose()
        return results.count("ok"), results.count("rejected"), b.budget

    with fault_upstream(default=Fault(token_delay_s=0.01, prompt_tokens=10, completion_tokens=9)) as up:
        ok, rejected, budget = asyncio.run(case(up))
    actual = 19.0  # 10 prompt + 9 completion tokens at $1 each
    assert ok + rejected == 150 and rejected > 0 and ok >= 5
    assert budget.reserved_usd() == pytest.approx(0.0)
    assert budget.spent_usd() == pytest.approx(ok * actual)
    assert budget.spent_usd() <= cap + worst
    assert len(up.requests) == ok  # a rejected escalation never reached the upstream


def test_cost_unknown_after_a_cut_stream_charges_the_reservation() -> None:
    async def case(up: FaultUpstream) -> SpendBudget:
        b = _backend(up.url)
        b.budget = SpendBudget(cap_usd=1000.0)
        try:
            with pytest.raises(UpstreamError):
                async for _ in b.stream(_request()):
                    pass
            refused = _backend("http://127.0.0.1:9/v1")
            refused.budget = b.budget
            with pytest.raises(UpstreamError):
                await refused.generate(_request())  # never reached a model: costs nothing
            await refused.aclose()
        finally:
            await b.aclose()
        return b.budget

    with fault_upstream(Fault("cut", cut_after=2)) as up:
        budget = asyncio.run(case(up))
    assert budget.spent_usd() == pytest.approx(_backend("")._worst_cost_usd(_request()))


def test_an_estimate_charges_a_cut_call_its_prompt_counted_here_and_the_tokens_received() -> None:
    """cut_charge "estimate" (the shadow budget's): a call cut after its response headers is billed
    by the provider, and charged the prompt's tokens counted here (30 bytes: 8 + 4 of framing)
    plus the completion tokens received before the cut, each cut attempt once; a call that never
    reached the provider, nothing. The caller's meter gets the same amounts."""
    from localroute.backends.budget import SpendMeter, current_meter

    prompt = 12  # ceil(30 / 4) + 4

    async def case(up: FaultUpstream) -> tuple[SpendBudget, list[float]]:
        b = _backend(up.url)
        b.cut_charge = "estimate"
        b.budget = SpendBudget(cap_usd=1000.0)
        spent: list[float] = []
        try:
            with pytest.raises(UpstreamError):
                async for _ in b.stream(_request()):  # two tokens, then the socket closes
                    pass
            spent.append(b.budget.spent_usd())
            b.retry = RetryPolicy(max_retries=1, base_delay_s=0.01, rng=random.Random(0))
            meter = SpendMeter()
            token = current_meter.set(meter)
            try:
                with pytest.raises(UpstreamError):
                    await b.generate(_request())  # headers and half a body, twice (retried)
            finally:
                current_meter.reset(token)
            spent.append(b.budget.spent_usd())
            spent.append(meter.usd)
            refused = _backend("http://127.0.0.1:9/v1")
            refused.cut_charge = "estimate"
            refused.budget = b.budget
            with pytest.raises(UpstreamError):
                await refused.generate(_request())
            await refused.aclose()
        finally:
            await b.aclose()
        return b.budget, spent

    with fault_upstream(Fault("cut", cut_after=2), Fault("cut"), Fault("cut")) as up:
        budget, spent = asyncio.run(case(up))
        assert len(up.requests) == 3
    assert _backend("")._local_prompt_tokens(_request()) == prompt
    assert spent[0] == pytest.approx(prompt + 2)  # the reservation (worst case) would be 46 + 16
    assert spent[1] - spent[0] == pytest.approx(2 * prompt) == spent[2]  # nothing of a cut body decodes
    assert budget.spent_usd() == pytest.approx(spent[1]) and budget.reserved_usd() == 0


def test_per_key_reservation_uses_the_request_key() -> None:
    async def case(up: FaultUpstream) -> SpendBudget:
        b = _backend(up.url)
        b.budget = SpendBudget(cap_usd=None, per_key_usd=99.0)
        token = current_key_id.set("key-a")
        try:
            await b.generate(_request())
            await b.generate(_request())
            with pytest.raises(BudgetExceededError):
                await b.generate(_request())  # 2 x 19 spent + 62 worst case > 99
        finally:
            current_key_id.reset(token)
            await b.aclose()
        return b.budget

    with fault_upstream(default=Fault(prompt_tokens=10, completion_tokens=9)) as up:
        budget = asyncio.run(case(up))
    assert budget.spent_usd("key-a") == pytest.approx(38.0)


def test_attach_needs_prices_for_every_remote_tier() -> None:
    b = OpenAIHTTPBackend("frontier", "http://127.0.0.1:9/v1", "no-such-model-xyz")
    tiers = [Tier("local", ScriptedBackend("local"), -1.0), Tier("frontier", b, None)]
    with pytest.raises(ConfigError) as info:
        attach_budget(tiers, Settings(budget_usd=1.0))
    assert info.value.param == "budget_usd"
    assert attach_budget(tiers, Settings()) is None
    b2 = _backend("http://127.0.0.1:9/v1")
    shared = attach_budget([Tier("frontier", b2, None)], Settings(budget_usd=1.0))
    assert shared is not None and b2.budget is shared


def _app(url: str, **kw: Any) -> Any:
    local = ScriptedBackend("local", text="local answer here", logprobs=-3.0)
    tiers = [Tier("local", local, -1.0), Tier("frontier", _backend(url), None)]
    return create_app(Settings(**{"budget_state_path": None, **kw}), tiers=tiers)


def _ask(base: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/chat/completions", headers=headers, timeout=30,
                      json={"model": "localroute/cascade", "max_tokens": 16,
                            "messages": [{"role": "user", "content": PROMPT}]})


def test_server_budget_exhausted_degrades_or_rejects_by_policy() -> None:
    with fault_upstream(default=Fault(prompt_tokens=10, completion_tokens=9)) as up:
        with serve_app(_app(up.url, budget_usd=70.0)) as base:
            first, second = _ask(base), _ask(base)
        assert first.headers["x-localroute-tier"] == "frontier"
        assert second.status_code == 200 and second.headers["x-localroute-tier"] == "local"
        assert second.headers["x-localroute-degraded"] == "frontier_budget_exceeded"
        assert second.json()["localroute"]["degraded"] == "frontier_budget_exceeded"

        with serve_app(_app(up.url, budget_usd=70.0, budget_exhausted_policy="reject")) as base:
            first, second = _ask(base), _ask(base)
        assert first.status_code == 200
        assert second.status_code == 429 and second.json()["error"]["code"] == "budget_exceeded"
        assert int(second.headers["retry-after"]) >= 1


def test_server_per_key_budget() -> None:
    with fault_upstream(default=Fault(prompt_tokens=10, completion_tokens=9)) as up, \
            serve_app(_app(up.url, api_keys="key-a,key-b", budget_per_key_usd=70.0)) as base:
        a1, a2, b1 = _ask(base, "key-a"), _ask(base, "key-a"), _ask(base, "key-b")
        health = httpx.get(f"{base.removesuffix('/v1')}/health", timeout=30)
    assert health.status_code == 200 and "budget" in health.json()  # /health needs no key
    shown = health.json()["budget"]
    assert set(shown) == {"period", "cap_usd", "per_key_usd", "spent_usd", "reserved_usd", "rejected_total"}
    assert all(not isinstance(v, dict | list) for v in shown.values())  # totals only: no key's own spend
    assert a1.headers["x-localroute-tier"] == "frontier"
    assert a2.headers["x-localroute-degraded"] == "frontier_budget_exceeded"
    assert b1.headers["x-localroute-tier"] == "frontier"


def test_single_node_spend_persists_across_restarts(tmp_path: Any) -> None:
    """Without Redis the settled spend is written to SQLite (budget_state_path): a new process
    (here a new budget over the same file) starts from what the period already spent."""
    path = tmp_path / "budget.sqlite"
    b = SpendBudget(cap_usd=1.0, per_key_usd=0.5, store=SpendStore(path))
    b.reserve(0.3, key_id="k").settle(0.25)
    b.reserve(0.3).settle(0.3)
    restarted = SpendBudget(cap_usd=1.0, per_key_usd=0.5, store=SpendStore(path))
    assert restarted.spent_usd() == pytest.approx(0.55) and restarted.spent_usd("k") == pytest.approx(0.25)
    with pytest.raises(BudgetExceededError):
        restarted.reserve(0.5)  # 0.55 + 0.5 > 1.0: the restart did not forget
    other_day = Clock(restarted._ends_at + 1)
    assert SpendBudget(1.0, store=SpendStore(path), clock=other_day).spent_usd() == 0.0  # a new period


def test_server_restart_remembers_spend(tmp_path: Any) -> None:
    """The default settings persist spend: a second app over the same file refuses what the first spent."""
    state = tmp_path / "spend.sqlite"
    with fault_upstream(Fault(prompt_tokens=40, completion_tokens=10)) as up:
        with serve_app(_app(up.url, budget_usd=70.0, budget_state_path=state, budget_exhausted_policy="reject")) as base:
            assert _ask(base).status_code == 200
        with serve_app(_app(up.url, budget_usd=70.0, budget_state_path=state, budget_exhausted_policy="reject")) as base:
            again = _ask(base)
    assert again.status_code == 429 and again.json()["error"]["code"] == "budget_exceeded"
    assert SpendBudget(70.0, store=SpendStore(state)).spent_usd() > 0


def test_settle_writes_spend_off_the_event_loop(tmp_path: Any) -> None:
    """Another writer holds the SQLite file for 0.4 s: `asettle` waits for it in a thread while the
    event loop keeps running other requests' work (a ticker keeps ticking), then persists."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "budget.sqlite"
    budget = SpendBudget(cap_usd=10.0, store=SpendStore(path, busy_timeout_s=2.0))
    other = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the write lock
    threading.Timer(0.4, lambda: other.execute("COMMIT")).start()

    async def run() -> int:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        started = time.monotonic()
        await budget.reserve(1.0).asettle(0.5)
        assert time.monotonic() - started >= 0.3  # it did wait for the lock
        done = True
        await task
        return ticks

    ticks = asyncio.run(run())
    other.close()
    assert ticks >= 15  # the loop ran meanwhile (blocked, it would tick about once)
    assert SpendStore(path).load(budget._label) == {"": pytest.approx(0.5)}
