"""Shared state in a real Redis (tests/services.py): budget reservations that hold across two
"replicas" (two connection pools), holds that expire, per-key rate limits, a shared breaker, and
the failure policy when Redis is paused or gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from localroute.backends.budget import BudgetExceededError, SharedSpendBudget
from localroute.backends.resilience import CircuitBreaker
from localroute.errors import BackendUnavailableError, RateLimitError
from localroute.shared_state import Limits, RateLimiter, RequestFlags, SharedState, request_flags
from tests.services import RedisServer, free_port, redis_server, redis_url


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with redis_url() as u:
        yield u


def _state(url: str, prefix: str, **kw: Any) -> SharedState:
    return SharedState(url, prefix=prefix, **kw)


def test_fifty_concurrent_reservations_from_two_replicas_never_pass_the_cap(url: str) -> None:
    """Each replica checks and holds in one script: of 50 concurrent worst-case holds of 0.1
    against a cap of 1.0, exactly 10 are granted, whichever replica asked."""
    prefix = f"t{time.time_ns()}:"

    async def run() -> tuple[int, int, float, float]:
        a, b = _state(url, prefix), _state(url, prefix)
        ba, bb = SharedSpendBudget(a, 1.0), SharedSpendBudget(b, 1.0)

        async def one(i: int) -> Any:
            try:
                return await (ba if i % 2 else bb).areserve(0.1)
            except BudgetExceededError:
                return None

        held = await asyncio.gather(*(one(i) for i in range(50)))
        granted = [r for r in held if r is not None]
        reserved = await ba.areserved_usd()
        for r in granted:
            await r.asettle(0.1)
            await r.asettle(0.1)  # a second settle is ignored
        await a.drain()
        await b.drain()
        spent = await bb.aspent_usd()
        await a.aclose()
        await b.aclose()
        return len(granted), 50 - len(granted), reserved, spent

    granted, refused, reserved, spent = asyncio.run(run())
    assert granted == 10 and refused == 40
    assert reserved == pytest.approx(1.0)
    assert spent == pytest.approx(1.0)


def test_per_key_cap_and_holds_that_expire(url: str) -> None:
    """A hold never settled (its replica died) is released after the TTL; a key's cap is its own."""
    prefix = f"t{time.time_ns()}:"

    async def run() -> None:
        state = _state(url, prefix)
        budget = SharedSpendBudget(state, 10.0, per_key_usd=1.0, hold_ttl_s=0.3)
        await budget.areserve(0.9, key_id="k1")  # never settled
        with pytest.raises(BudgetExceededError) as info:
            await budget.areserve(0.2, key_id="k1")
        assert "API key" in info.value.message
        await budget.areserve(0.9, key_id="k2")
        assert await budget.areserved_usd() == pytest.approx(1.8)
        await asyncio.sleep(0.4)
        assert await budget.areserved_usd() == 0.0  # both expired
        res = await budget.areserve(0.9, key_id="k1")
        await res.asettle(0.5)
        await state.drain()
        assert await budget.aspent_usd("k1") == pytest.approx(0.5)
        await state.aclose()

    asyncio.run(run())


def test_rate_limits_across_two_replicas(url: str) -> None:
    prefix = f"t{time.time_ns()}:"

    async def run() -> None:
        a, b = _state(url, prefix), _state(url, prefix)
        limits = {"k": Limits(requests_per_min=5), "c": Limits(concurrent=2), "t": Limits(tokens_per_min=100)}
        la, lb = RateLimiter(a, None, limits), RateLimiter(b, None, limits)
        assert await la.admit("nobody", "x") is None  # no default: no limits

        async def one(i: int) -> float | None:
            try:
                await (la if i % 2 else lb).admit("k", f"r{i}")
                return None
            except RateLimitError as exc:
                return exc.retry_after_s

        waits = await asyncio.gather(*(one(i) for i in range(12)))
        assert sum(w is None for w in waits) == 5
        assert all(w is not None and 1 <= w <= 60 for w in waits if w is not None)

        first = await la.admit("c", "c1")
        await lb.admit("c", "c2")
        with pytest.raises(RateLimitError) as info:
            await la.admit("c", "c3")
        assert "concurrent" in info.value.message and info.value.status_code == 429
        await la.release(first)
        await lb.admit("c", "c4")

        await la.admit("t", "t1")
        la.add_tokens("t", 120)
        await a.drain()  # counted by a background task
        with pytest.raises(RateLimitError) as info:
            await lb.admit("t", "t2")
        assert "tokens" in info.value.message
        await a.aclose()
        await b.aclose()

    asyncio.run(run())


def test_an_open_breaker_is_shared(url: str) -> None:
    prefix = f"t{time.time_ns()}:"

    async def run() -> None:
        a, b = _state(url, prefix), _state(url, prefix)
        ba, bb = CircuitBreaker("frontier", failure_threshold=1, reset_s=5), CircuitBreaker("frontier", 1, 5)
        a.attach_breaker(ba, poll_s=0.05)
        b.attach_breaker(bb, poll_s=0.05)
        a.start()
        b.start()
        ba.record_failure()
        assert ba.state == "open"
        for _ in range(40):
            await asyncio.sleep(0.05)
            if bb.state == "open":
                break
        assert bb.state == "open" and bb.adopted_total == 1
        await a.aclose()
        await b.aclose()

    asyncio.run(run())


def test_failure_policy_when_redis_is_gone() -> None:
    """Nothing listens: fail_open reserves and admits locally (the request flagged, the fallback
    counted); fail_closed refuses with 503 shared_state_unavailable and a Retry-After."""
    gone = f"redis://127.0.0.1:{free_port()}/0"

    async def run() -> None:
        state = SharedState(gone, timeout_s=0.1, failure="fail_open", retry_s=5)
        budget = SharedSpendBudget(state, 1.0)
        limiter = RateLimiter(state, Limits(requests_per_min=1), {})
        flags = RequestFlags()
        token = request_flags.set(flags)
        started = time.monotonic()
        res = await budget.areserve(0.6)
        with pytest.raises(BudgetExceededError):
            await budget.areserve(0.6)  # the local fallback still caps
        await limiter.admit(None, "r1")
        with pytest.raises(RateLimitError):
            await limiter.admit(None, "r2")
        assert time.monotonic() - started < 1.0  # one bounded timeout, then the retry window
        request_flags.reset(token)
        assert flags.local == {"budget", "rate_limit"}
        assert state.fallbacks == {"budget": 2, "rate_limit": 2} and not state.up
        await res.asettle(0.5)
        await state.drain()
        assert budget.snapshot()["pending_replays"] == 1  # charged to Redis once it is back
        await state.aclose()

        closed = SharedState(gone, timeout_s=0.1, failure="fail_closed", retry_s=2)
        with pytest.raises(BackendUnavailableError) as info:
            await SharedSpendBudget(closed, 1.0).areserve(0.1)
        assert info.value.status_code == 503 and info.value.code == "shared_state_unavailable"
        assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1
        with pytest.raises(BackendUnavailableError):
            await RateLimiter(closed, Limits(concurrent=1), {}).admit("k", "r")
        assert closed.refusals == {"budget": 1, "rate_limit": 1}
        await closed.aclose()

    asyncio.run(run())


def test_paused_redis_costs_a_bounded_wait_and_charges_replay_after() -> None:
    """CLIENT PAUSE: a call gives up after the timeout (never hangs); a charge made locally
    meanwhile reaches Redis once it answers again."""
    with redis_server() as server:
        asyncio.run(_paused(server))


async def _paused(server: RedisServer) -> None:
    state = SharedState(server.url, timeout_s=0.1, failure="fail_open", retry_s=0.2)
    budget = SharedSpendBudget(state, 10.0)
    await (await budget.areserve(0.5)).asettle(0.5)
    await state.drain()
    server.pause(700)
    started = time.monotonic()
    res = await budget.areserve(1.0)
    assert res.local is not None and time.monotonic() - started < 0.5
    await res.asettle(1.0)
    await state.drain()
    await asyncio.sleep(0.8)  # the pause is over
    await (await budget.areserve(0.1)).asettle(0.0)  # first call back replays the charge
    await state.drain()
    assert await budget.aspent_usd() == pytest.approx(1.5)
    await state.aclose()


def test_overlapping_reservations_after_an_outage_replay_each_charge_once() -> None:
    """Charges made locally during an outage, then 20 overlapping reservations once Redis is back:
    none fails (no IndexError from two drains popping one queue), every charge reaches Redis once."""
    with redis_server() as server:
        asyncio.run(_overlapping_replays(server))


async def _overlapping_replays(server: RedisServer) -> None:
    state = SharedState(server.url, timeout_s=0.1, failure="fail_open", retry_s=0.2)
    budget = SharedSpendBudget(state, 100.0)
    server.pause(600)
    local = [await budget.areserve(0.5) for _ in range(5)]
    assert all(r.local is not None for r in local)
    for r in local:
        await r.asettle(0.25)
    await state.drain()
    assert budget.snapshot()["pending_replays"] == 5
    await asyncio.sleep(0.8)  # the pause and the retry window are over
    got = await asyncio.gather(*(budget.areserve(0.1) for _ in range(20)), return_exceptions=True)
    assert not [g for g in got if isinstance(g, BaseException)]
    await state.drain()
    assert budget.snapshot()["pending_replays"] == 0
    assert await budget.aspent_usd() == pytest.approx(1.25)
    await state.aclose()


def test_a_settle_replayed_after_its_hold_ttl_charges_once(url: str) -> None:
    """The 'done' marker outlives the hold TTL (it lasts the period): a settle whose first send did
    reach Redis, sent again after a long outage, is not charged twice."""
    prefix = f"t{time.time_ns()}:"

    async def run() -> None:
        state = _state(url, prefix)
        budget = SharedSpendBudget(state, 10.0, hold_ttl_s=0.1)
        res = await budget.areserve(1.0)
        assert await budget._send_settle(res.rid, 0.4, None, res.period)
        await asyncio.sleep(0.35)  # past hold_ttl * 2 (the old marker's life)
        assert await budget.areserved_usd() == 0.0  # runs the reaper
        assert await budget._send_settle(res.rid, 0.4, None, res.period)  # the replay
        assert await budget.aspent_usd() == pytest.approx(0.4)
        await state.aclose()

    asyncio.run(run())


def test_a_lease_released_while_redis_is_down_is_released_once_it_is_back() -> None:
    """A release that meets the retry window is queued, not dropped: with concurrent=1 the key is
    admitted again as soon as Redis answers, not after lease_ttl."""
    with redis_server() as server:
        asyncio.run(_release_after_outage(server))


async def _release_after_outage(server: RedisServer) -> None:
    state = SharedState(server.url, timeout_s=0.1, failure="fail_open", retry_s=0.2)
    limiter = RateLimiter(state, None, {"k": Limits(concurrent=1), "o": Limits(concurrent=5)})
    first = await limiter.admit("k", "r1")
    assert first is not None and first.shared
    server.pause(400)
    other = await limiter.admit("o", "o1")  # times out: Redis is now down for retry_s
    assert other is not None and not other.shared and not state.up
    await limiter.release(first)  # refused at once (the retry window): queued
    await limiter.release(other)  # fell back, yet its ADMIT may have run: queued too
    assert limiter.unreleased == 2
    await asyncio.sleep(0.6)
    again = await limiter.admit("k", "r2")  # the queued releases are sent first
    assert again is not None and again.shared and limiter.unreleased == 0
    await limiter.release(again)
    await state.aclose()


class SlowReplies:
    """A TCP proxy in front of Redis that, while `delay_s` > 0, holds Redis's replies back that
    long (the commands reach Redis at once): a call that ran but whose reply timed out."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await r.read(65536):
                    if slow and self.delay_s > 0:
                        await asyncio.sleep(self.delay_s)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw, False), pipe(sr, cw, True))

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()


def test_fail_closed_releases_a_hold_whose_reply_timed_out() -> None:
    """Under fail_closed a reserve that ran in Redis but whose reply timed out (a slow link): the
    background settle of 0 releases that hold instead of leaving it counted for hold_ttl."""
    with redis_server() as server:
        asyncio.run(_fail_closed_lost_reply(server))


async def _fail_closed_lost_reply(server: RedisServer) -> None:
    proxy = SlowReplies(server.port)
    await proxy.start()
    state = SharedState(proxy.url, timeout_s=0.1, failure="fail_closed", retry_s=0.2)
    budget = SharedSpendBudget(state, 10.0, hold_ttl_s=60)
    watcher = SharedState(server.url, timeout_s=1.0)
    await budget.areserved_usd()  # the scripts loaded, the connection made
    proxy.delay_s = 0.5
    with pytest.raises(BackendUnavailableError):
        await budget.areserve(2.0)  # ran in Redis; the reply comes too late
    assert await SharedSpendBudget(watcher, 10.0).areserved_usd() == pytest.approx(2.0)
    proxy.delay_s = 0.0
    await asyncio.sleep(0.3)  # the retry window is over
    await budget.areserve(0.1)  # starts the replay of the queued release
    await state.drain()
    held = await SharedSpendBudget(watcher, 10.0).areserved_usd()
    assert held == pytest.approx(0.1)  # only the second hold; 2.0 released
    await state.aclose()
    await watcher.aclose()
    await proxy.aclose()


def test_a_fallback_admission_also_releases_a_lease_its_lost_admit_wrote() -> None:
    """An ADMIT that ran in Redis with its reply lost left a lease there while the request was
    admitted locally: releasing that admission removes the Redis lease too (concurrent=1 admits
    the next request instead of a 429 for lease_ttl)."""
    with redis_server() as server:
        asyncio.run(_lost_admit(server))


async def _lost_admit(server: RedisServer) -> None:
    proxy = SlowReplies(server.port)
    await proxy.start()
    state = SharedState(proxy.url, timeout_s=0.1, failure="fail_open", retry_s=0.2)
    limiter = RateLimiter(state, None, {"k": Limits(concurrent=1)})
    await limiter.release(await limiter.admit("k", "warm"))  # the script loaded, a connection made
    proxy.delay_s = 0.5
    lost = await limiter.admit("k", "lost")  # ran in Redis; the reply comes too late
    assert lost is not None and not lost.shared
    proxy.delay_s = 0.0
    await limiter.release(lost)
    assert limiter.local.leases["k"] == 0
    await asyncio.sleep(0.3)  # the retry window is over
    nxt = await limiter.admit("k", "next")
    assert nxt is not None and nxt.shared
    await limiter.release(nxt)
    await state.aclose()
    await proxy.aclose()
