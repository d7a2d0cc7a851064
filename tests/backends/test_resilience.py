"""Retry policy, Retry-After parsing and the circuit breaker (pure logic, injectable clocks)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from localroute.backends.resilience import CircuitBreaker, CircuitOpenError, RetryPolicy, parse_retry_after


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    now = 1_800_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 7, UTC), usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7.0, abs=1.0)
    past = format_datetime(datetime.fromtimestamp(now - 60, UTC), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None


def test_backoff_has_full_jitter_within_the_exponential_ceiling() -> None:
    policy = RetryPolicy(max_retries=5, base_delay_s=0.5, max_delay_s=3.0, rng=random.Random(1))
    for retry, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)]:
        delays = [policy.delay(retry) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 3  # jittered, not a constant


def test_retry_after_is_obeyed_with_a_little_jitter() -> None:
    policy = RetryPolicy(rng=random.Random(2))
    delays = [policy.delay(0, retry_after_s=2.0) for _ in range(100)]
    assert all(2.0 <= d <= 2.0 * 1.1 + 0.01 for d in delays)
    assert len(set(delays)) > 50


def test_total_retry_wait_is_capped() -> None:
    policy = RetryPolicy(max_retries=10, max_total_wait_s=5.0, rng=random.Random(3))
    assert policy.next_wait(0, waited_s=0.0, remaining_s=100.0, retry_after_s=4.0) is not None
    assert policy.next_wait(1, waited_s=4.2, remaining_s=100.0, retry_after_s=4.0) is None  # cap
    assert policy.next_wait(0, waited_s=0.0, remaining_s=3.0, retry_after_s=4.0) is None  # deadline
    assert policy.next_wait(10, waited_s=0.0, remaining_s=100.0, retry_after_s=None) is None  # count
    assert RetryPolicy(max_retries=0).next_wait(0, 0.0, 100.0, None) is None


def test_breaker_opens_after_threshold_and_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", failure_threshold=3, reset_s=10.0, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        breaker.before_call()
    assert info.value.status_code == 503
    assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1.0


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("up", failure_threshold=2, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_half_open_admits_limited_probes_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", failure_threshold=1, reset_s=5.0, half_open_probes=1, clock=clock)
    breaker.record_failure()
    assert breaker.state == "open"
    clock.t += 5.0
    assert breaker.state == "half_open"
    assert breaker.before_call() is True  # the probe, and the caller is told so (one attempt, no retry)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a second caller while the probe is out
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.before_call() is False  # an ordinary call


def test_half_open_failure_reopens_and_restarts_the_timer() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", failure_threshold=1, reset_s=5.0, clock=clock)
    breaker.record_failure()
    clock.t += 6.0
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.t += 4.0
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.t += 1.0
    breaker.before_call()
    assert breaker.opened_total == 2


def test_released_probe_lets_another_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", failure_threshold=1, reset_s=1.0, clock=clock)
    breaker.record_failure()
    clock.t += 1.0
    breaker.before_call()
    breaker.release_probe()  # the probe's client went away: no verdict
    breaker.before_call()
    assert breaker.state == "half_open"
