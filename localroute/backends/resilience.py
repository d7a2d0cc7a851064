"""How localroute survives a failing upstream: deadlines, retries and a circuit breaker.

Why each piece exists:

- `Deadlines`: one number is not enough. A dead host must fail in `connect_s`; an upstream that
  accepts and then thinks for ever must fail in `first_token_s`; a stream that stalls mid-way
  (often while still sending keep-alive comments, which keep a plain socket read timeout happy)
  must fail in `idle_s`; and nothing may take longer than `total_s`, retries included.
- `RetryPolicy`: retries happen only before the first byte reaches our client (the caller enforces
  that), with full jitter so that many clients do not retry in lock-step, obeying the upstream's
  `Retry-After` (seconds or HTTP-date), and with the sum of all waits capped so a retry storm can
  never hold a request hostage.
- `CircuitBreaker`: after repeated failures the upstream is presumed down and requests fail at once
  (the cascade then answers locally, flagged degraded) instead of each paying the deadlines; after
  `reset_s` a limited number of half-open probes test the water, and one success closes it again.
  A probe is one attempt, never retried, and its whole answer (or error) must come within the
  first-token deadline: its failure reopens the circuit, so a retry could only fail fast (or, with
  a short `reset_s`, take the next probe's place), while its client waited on backoff for nothing.
  With `redis_url` the open state is shared by every replica (`localroute.shared_state`): the
  `on_open` / `on_close` hooks publish it and `adopt_open` takes another replica's.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Literal

from localroute.errors import CircuitOpenError

__all__ = [
    "CircuitBreaker",
    "CircuitOpenError",
    "Deadlines",
    "RetryPolicy",
    "parse_retry_after",
]

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Separate limits for one upstream call, in seconds. `total_s` includes every retry."""

    connect_s: float = 5.0
    first_token_s: float = 30.0
    idle_s: float = 30.0
    total_s: float = 120.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date; None if absent
    or unparseable (the caller then uses its own backoff)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter; Retry-After wins when the upstream sends one."""

    max_retries: int = 2
    base_delay_s: float = 0.25
    max_delay_s: float = 4.0
    max_total_wait_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry: int, retry_after_s: float | None = None) -> float:
        """Wait before retry number `retry` (0-based). With Retry-After, wait at least that long
        plus up to 10% jitter, so clients told the same date do not return at the same instant."""
        if retry_after_s is not None:
            return retry_after_s + self.rng.uniform(0.0, 0.1 * retry_after_s + 0.01)
        ceiling = min(self.max_delay_s, self.base_delay_s * (2**retry))
        return self.rng.uniform(0.0, ceiling)

    def next_wait(self, retry: int, waited_s: float, remaining_s: float, retry_after_s: float | None) -> float | None:
        """The wait before the next try, or None when no retry is allowed: out of retries, the
        capped total wait would be exceeded, or the wait would outlive the total deadline."""
        if retry >= self.max_retries:
            return None
        wait = self.delay(retry, retry_after_s)
        if waited_s + wait > self.max_total_wait_s or wait >= remaining_s:
            return None
        return wait


class CircuitBreaker:
    """Per-upstream breaker: closed -> open after `failure_threshold` consecutive failures;
    open -> half-open after `reset_s`; half-open lets `half_open_probes` calls through at once,
    closing on a success and reopening on a failure. Thread-safe; the clock is injectable."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_s: float = 30.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.reset_s = reset_s
        self.half_open_probes = max(1, half_open_probes)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self.opened_total = 0
        self.adopted_total = 0
        # called (outside the lock) when this breaker opens or a probe closes it: shared state
        self.on_open: Callable[[str, float], None] | None = None
        self.on_close: Callable[[str], None] | None = None

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_s:
            self._state = "half_open"
            self._probes = 0

    def before_call(self) -> bool:
        """Raise CircuitOpenError (with the time left until the next probe as retry_after_s)
        unless a call may go through now; True when the call is a half-open probe."""
        with self._lock:
            self._maybe_half_open()
            if self._state == "closed":
                return False
            if self._state == "half_open" and self._probes < self.half_open_probes:
                self._probes += 1
                return True
            wait = max(0.0, self.reset_s - (self._clock() - self._opened_at))
        raise CircuitOpenError(
            f"upstream {self.name} is failing; circuit open, next probe in {wait:.1f}s",
            retry_after_s=max(wait, 1.0),
        )

    def record_success(self) -> None:
        with self._lock:
            was = self._state
            self._state = "closed"
            self._failures = 0
            self._probes = 0
        if was != "closed" and self.on_close is not None:
            self.on_close(self.name)

    def record_failure(self) -> None:
        with self._lock:
            opened = False
            if self._state == "half_open":
                self._open()
                opened = True
            else:
                self._failures += 1
                if self._state == "closed" and self._failures >= self.failure_threshold:
                    self._open()
                    opened = True
        if opened and self.on_open is not None:
            self.on_open(self.name, self.reset_s)

    def adopt_open(self, remaining_s: float) -> None:
        """Another replica opened this upstream's breaker with `remaining_s` of its reset left:
        open here too (a closed breaker only; an open or probing one keeps its own timing)."""
        with self._lock:
            if self._state != "closed":
                return
            self._open()
            self._opened_at = self._clock() - max(0.0, self.reset_s - remaining_s)
            self.opened_total -= 1
            self.adopted_total += 1

    def release_probe(self) -> None:
        """A half-open probe ended without a verdict (e.g. the client went away): free its place."""
        with self._lock:
            if self._state == "half_open" and self._probes > 0:
                self._probes -= 1

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._failures = 0
        self._probes = 0
        self.opened_total += 1
