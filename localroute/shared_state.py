"""State shared by every replica, in Redis: budget reservations, per-key rate limits and circuit
breakers (settings `redis_url`, `shared_state_*`). Without `redis_url` all of it is per process.

Why it is built this way:

- Every check is one Lua script (`EVALSHA`), which Redis runs atomically: a reservation, or a rate
  limit's check-and-count, cannot interleave with another replica's. Times come from Redis
  (`TIME`), so replicas' clocks do not matter.
- Every Redis call is bounded (`shared_state_timeout_s`, no client retries): an unreachable or
  paused Redis costs a request at most that long, never a hang. The bound is one
  `asyncio.timeout` around the whole call (connection, command, reply); redis-py's own
  `socket_timeout` is off, because with it each command also runs its write in a task
  (`asyncio.wait_for`), on the request path. After a failure Redis is not
  tried again for `shared_state_retry_s`, so an outage costs one timeout per retry window, not one
  per request.
- What a failure means is a setting, `shared_state_failure`: `fail_open` falls back to this
  process's own counters (the request is served; the response carries
  `x-localroute-shared-state: local` and `/metrics` counts the fallback), `fail_closed` refuses the
  request with 503, `Retry-After` and an OpenAI-shaped error (`shared_state_unavailable`).
- Budget holds and concurrency leases carry a deadline (reaped inside the scripts), so those of a
  replica that crashed expire instead of holding the budget for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from localroute.errors import BackendUnavailableError, MissingExtraError, RateLimitError

if TYPE_CHECKING:
    from localroute.backends.resilience import CircuitBreaker

log = logging.getLogger(__name__)

__all__ = ["Limits", "RateLimiter", "RequestFlags", "SharedState", "SharedStateDown", "request_flags"]

FailurePolicy = Literal["fail_open", "fail_closed"]
T = TypeVar("T")

WINDOW_MS = 60_000


@dataclass(slots=True)
class RequestFlags:
    """What fell back to local state while serving one request (set by the HTTP edge, read back
    into the `x-localroute-shared-state` header). A mutable holder, so code running in a copied
    context (a task) still marks the request's own flags."""

    local: set[str] = field(default_factory=set)


request_flags: ContextVar[RequestFlags | None] = ContextVar("localroute_shared_state_flags", default=None)


class SharedStateDown(Exception):
    """Redis did not answer in time (or at all); the caller applies the failure policy."""


# ---------- the scripts ----------

# KEYS: per scope (global, then the key's) three keys: budget hash {spent, held}, holds zset
# (rid -> deadline ms), amounts hash (rid -> nano-USD held, or 'done' once settled).
# ARGV: rid, amount (nano-USD; -1: only reap expired holds), hold ttl ms, expire-at (epoch s), then
# one limit per scope (-1: none). -> {1, committed_of_scope_0} or {0, index of the scope that refused}
RESERVE = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rid, amt, ttl, exp = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 3
local first = 0
for s = 0, n - 1 do
  local bud, holds, amts = KEYS[s * 3 + 1], KEYS[s * 3 + 2], KEYS[s * 3 + 3]
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', holds, '-inf', now)) do
    local a = tonumber(redis.call('HGET', amts, old) or '')
    if a then redis.call('HINCRBY', bud, 'held', -a) end
    redis.call('HDEL', amts, old); redis.call('ZREM', holds, old)
  end
  if amt < 0 then
    if s == n - 1 then return {1, -1} end
  elseif redis.call('HEXISTS', amts, rid) == 1 then return {1, -1} end
  local committed = tonumber(redis.call('HGET', bud, 'spent') or '0') + tonumber(redis.call('HGET', bud, 'held') or '0')
  if s == 0 then first = committed end
  local limit = tonumber(ARGV[5 + s])
  if limit >= 0 and committed + amt > limit then return {0, s} end
end
for s = 0, n - 1 do
  local bud, holds, amts = KEYS[s * 3 + 1], KEYS[s * 3 + 2], KEYS[s * 3 + 3]
  redis.call('HINCRBY', bud, 'held', amt); redis.call('HSET', amts, rid, amt); redis.call('ZADD', holds, now + ttl, rid)
  redis.call('EXPIREAT', bud, exp); redis.call('EXPIREAT', holds, exp); redis.call('EXPIREAT', amts, exp)
end
return {1, first + amt}
"""

# Same KEYS; ARGV: rid, actual (nano-USD), expire-at. Releases the hold if it is still there and
# charges `actual` once (a replayed settle of the same rid is a no-op). The 'done' marker stays in
# the amounts hash until the period's keys expire (not on the holds zset, whose entries the reaper
# drops after a hold's TTL): a settle replayed after a long outage, whose first send did reach
# Redis, must still find it. Cost: one hash field (~70 bytes) per settled call per scope and period.
SETTLE = """
local rid, actual, exp = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 3
local charged = 0
for s = 0, n - 1 do
  local bud, holds, amts = KEYS[s * 3 + 1], KEYS[s * 3 + 2], KEYS[s * 3 + 3]
  local held = redis.call('HGET', amts, rid)
  if held ~= 'done' then
    local a = tonumber(held or '')
    if a then redis.call('HINCRBY', bud, 'held', -a) end
    redis.call('HINCRBY', bud, 'spent', actual)
    redis.call('HSET', amts, rid, 'done'); redis.call('ZREM', holds, rid)
    redis.call('EXPIREAT', bud, exp); redis.call('EXPIREAT', holds, exp); redis.call('EXPIREAT', amts, exp)
    charged = 1
  end
end
return charged
"""

# KEYS: requests zset (rid -> ms), leases zset (rid -> deadline ms), tokens hash (epoch s -> n).
# ARGV: rid, requests/min, tokens/min, concurrent (0: no limit), lease ttl ms.
# -> {1, 'ok', 0} or {0, which limit, retry-after ms}
ADMIT = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rid, rpm, tpm, conc, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local W = 60000
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - W)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, 'requests_per_min', tonumber(oldest[2]) + W - now}
  end
end
if tpm > 0 then
  local sum, oldest = 0, nil
  local h = redis.call('HGETALL', KEYS[3])
  for i = 1, #h, 2 do
    local sec = tonumber(h[i])
    if sec * 1000 <= now - W then redis.call('HDEL', KEYS[3], h[i])
    else
      sum = sum + tonumber(h[i + 1])
      if oldest == nil or sec < oldest then oldest = sec end
    end
  end
  if sum >= tpm then return {0, 'tokens_per_min', oldest * 1000 + W - now} end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {0, 'concurrent', 1000} end
  redis.call('ZADD', KEYS[2], now + ttl, rid); redis.call('PEXPIRE', KEYS[2], ttl)
end
if rpm > 0 then redis.call('ZADD', KEYS[1], now, rid); redis.call('PEXPIRE', KEYS[1], W) end
return {1, 'ok', 0}
"""

# KEYS: tokens hash; ARGV: tokens. Counted in the second Redis says it is.
ADD_TOKENS = """
local t = redis.call('TIME')
redis.call('HINCRBY', KEYS[1], t[1], tonumber(ARGV[1])); redis.call('PEXPIRE', KEYS[1], 120000)
return 1
"""


# ---------- the connection and the failure policy ----------


class SharedState:
    """One Redis connection pool with bounded calls, the failure policy and its counters."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.25,
        failure: FailurePolicy = "fail_open",
        retry_s: float = 1.0,
        prefix: str = "localroute:",
    ) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise MissingExtraError("redis-py (for redis_url)", "shared") from exc
        self.url = url
        self.timeout_s = timeout_s
        self.failure: FailurePolicy = failure
        self.retry_s = retry_s
        self.prefix = prefix
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=None,  # `call` bounds each call; redis-py's would add a task per command
            socket_connect_timeout=timeout_s,
            retry=None,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.scripts = {
            name: self.client.register_script(src)
            for name, src in (
                ("reserve", RESERVE),
                ("settle", SETTLE),
                ("admit", ADMIT),
                ("add_tokens", ADD_TOKENS),
            )
        }
        self._down_until = 0.0
        self.errors_total = 0
        self.fallbacks: dict[str, int] = {}
        self.refusals: dict[str, int] = {}
        self.last_error: str | None = None
        self.breakers: list[CircuitBreaker] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def up(self) -> bool:
        """False while inside the retry window after a failed call."""
        return time.monotonic() >= self._down_until

    async def call(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call within the timeout, or raise SharedStateDown (at once while down)."""
        if not self.up:
            raise SharedStateDown(self.last_error or "redis unavailable")
        from redis.exceptions import RedisError

        try:
            # one timer, no extra task (unlike wait_for); a reply cut off here closes its connection
            async with asyncio.timeout(self.timeout_s):
                return await factory()
        except (RedisError, OSError, TimeoutError) as exc:
            self.errors_total += 1
            if self.up:
                log.warning(
                    "shared state (redis) unavailable for %.1fs: %s", self.retry_s, type(exc).__name__
                )
            self._down_until = time.monotonic() + self.retry_s
            self.last_error = type(exc).__name__
            raise SharedStateDown(self.last_error) from None

    def script(self, name: str, keys: list[str], args: list[Any]) -> Callable[[], Awaitable[Any]]:
        s = self.scripts[name]
        return lambda: s(keys=keys, args=args)

    def fallback(self, part: str, retry_after_s: float | None = None) -> None:
        """Redis failed for `part`: fail_open marks the request and counts it (the caller then uses
        local state); fail_closed raises the 503."""
        if self.failure == "fail_closed":
            self.refusals[part] = self.refusals.get(part, 0) + 1
            raise BackendUnavailableError(
                "shared state (redis) is unavailable and shared_state_failure is fail_closed; retry shortly",
                code="shared_state_unavailable",
                retry_after_s=max(1.0, retry_after_s or self.retry_s),
            )
        self.fallbacks[part] = self.fallbacks.get(part, 0) + 1
        flags = request_flags.get()
        if flags is not None:
            flags.local.add(part)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Fire and forget on the running loop (a reference kept until it ends)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the fire-and-forget calls (settles, token counts) started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- circuit breakers ----

    def attach_breaker(self, breaker: CircuitBreaker, poll_s: float = 0.5) -> None:
        """Share `breaker`'s open state: when it opens here, the others open too (for what is left
        of its reset time); a success that closes it clears the shared state."""
        self.breakers.append(breaker)
        breaker.on_open = self._breaker_opened
        breaker.on_close = self._breaker_closed
        self._poll_s = poll_s

    def _breaker_opened(self, name: str, reset_s: float) -> None:
        key = self.key("breaker", name)
        self._in_loop(
            lambda: self.spawn(self._quiet(lambda: self.client.set(key, "open", px=int(reset_s * 1000))))
        )

    def _breaker_closed(self, name: str) -> None:
        key = self.key("breaker", name)
        self._in_loop(lambda: self.spawn(self._quiet(lambda: self.client.delete(key))))

    @staticmethod
    def _in_loop(fn: Callable[[], None]) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a thread, a test without one): the state stays local
        fn()

    async def _quiet(self, factory: Callable[[], Awaitable[Any]]) -> None:
        try:
            await self.call(factory)
        except SharedStateDown:
            pass

    def start(self) -> None:
        """Start the breaker poller on the running loop (once)."""
        if self._poller is None and self.breakers:
            self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            for breaker in self.breakers:
                key = self.key("breaker", breaker.name)
                try:
                    ttl_ms = await self.call(lambda key=key: self.client.pttl(key))  # type: ignore[misc]
                except SharedStateDown:
                    break
                if ttl_ms > 0:
                    breaker.adopt_open(ttl_ms / 1000)

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._tasks):
            with _suppress():
                await asyncio.wait_for(task, self.timeout_s * 2)
        with _suppress():
            await self.client.aclose()

    def snapshot(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "up": self.up,
            "failure": self.failure,
            "errors_total": self.errors_total,
            "fallbacks": dict(self.fallbacks),
            "refusals": dict(self.refusals),
        }

    def metrics(self) -> Iterator[Any]:
        """Prometheus families for /metrics."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "localroute_shared_state_up",
            "1 when Redis (shared state) answers, 0 while this replica uses local state or refuses.",
            value=1.0 if self.up else 0.0,
        )
        yield CounterMetricFamily(
            "localroute_shared_state_errors", "Redis calls that failed or timed out.", value=self.errors_total
        )
        fb = CounterMetricFamily(
            "localroute_shared_state_fallbacks",
            "Requests served on local state while Redis was unavailable (fail_open).",
            labels=["part"],
        )
        for part, n in sorted(self.fallbacks.items()):
            fb.add_metric([part], n)
        yield fb
        rf = CounterMetricFamily(
            "localroute_shared_state_refusals",
            "Requests refused with 503 because Redis was unavailable (fail_closed).",
            labels=["part"],
        )
        for part, n in sorted(self.refusals.items()):
            rf.add_metric([part], n)
        yield rf


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


# ---------- rate limits ----------


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; None: no limit of that kind."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    concurrent: int | None = None

    @property
    def empty(self) -> bool:
        return self.requests_per_min is None and self.tokens_per_min is None and self.concurrent is None


@dataclass(slots=True)
class Admission:
    key: str
    request_id: str
    shared: bool  # counted in Redis (else in this process)
    concurrent: bool


class _LocalWindows:
    """This process's own counters: the fallback of the shared ones, and the only ones without Redis."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.requests: dict[str, deque[float]] = {}
        self.tokens: dict[str, deque[tuple[float, int]]] = {}
        self.leases: dict[str, int] = {}

    def admit(self, key: str, limits: Limits) -> tuple[str, float] | None:
        now = self._clock()
        reqs = self.requests.setdefault(key, deque())
        while reqs and reqs[0] <= now - 60:
            reqs.popleft()
        if limits.requests_per_min is not None and len(reqs) >= limits.requests_per_min:
            return "requests_per_min", reqs[0] + 60 - now
        toks = self.tokens.setdefault(key, deque())
        while toks and toks[0][0] <= now - 60:
            toks.popleft()
        if limits.tokens_per_min is not None and sum(n for _, n in toks) >= limits.tokens_per_min:
            return "tokens_per_min", toks[0][0] + 60 - now
        if limits.concurrent is not None and self.leases.get(key, 0) >= limits.concurrent:
            return "concurrent", 1.0
        reqs.append(now)
        if limits.concurrent is not None:
            self.leases[key] = self.leases.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        if self.leases.get(key, 0) > 0:
            self.leases[key] -= 1

    def add_tokens(self, key: str, n: int) -> None:
        self.tokens.setdefault(key, deque()).append((self._clock(), n))


class RateLimiter:
    """Requests/min, tokens/min and concurrent requests per API key (a sliding 60 s window),
    in Redis when `state` is given (one limit across every replica), else per process.

    Tokens are counted when a request ends (prompt + completion), so a request is admitted while
    the window's tokens are under the limit and one request may take it past."""

    def __init__(
        self,
        state: SharedState | None,
        default: Limits | None,
        per_key: dict[str, Limits],
        lease_ttl_s: float = 600.0,
    ) -> None:
        self.state = state
        self.default = default
        self.per_key = per_key
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.local = _LocalWindows()
        self.rejected: dict[str, int] = {}
        # Redis leases whose release failed (or whose admission fell back after ADMIT may have
        # run): lease zset key, request id. ZREM is idempotent, so they are retried until Redis
        # takes them, before the next admission, rather than left blocking a key for lease_ttl.
        self._unreleased: deque[tuple[str, str]] = deque(maxlen=10_000)  # beyond: they expire
        self._flush_lock = asyncio.Lock()

    @property
    def unreleased(self) -> int:
        """Concurrency leases still to be removed from Redis."""
        return len(self._unreleased)

    async def _flush_releases(self) -> None:
        """Send the queued releases in one pipelined call; put them back if Redis fails again."""
        state = self.state
        if state is None or not self._unreleased or not state.up:
            return
        async with self._flush_lock:
            batch = list(self._unreleased)
            self._unreleased.clear()
            if not batch:
                return

            async def send() -> Any:
                pipe = state.client.pipeline(transaction=False)
                for lease, rid in batch:
                    pipe.zrem(lease, rid)
                return await pipe.execute()

            try:
                await state.call(send)
            except SharedStateDown:
                self._unreleased.extendleft(reversed(batch))

    def limits_for(self, key_id: str | None) -> Limits | None:
        limits = self.per_key.get(key_id or "", self.default)
        return None if limits is None or limits.empty else limits

    def _keys(self, key: str) -> list[str]:
        assert self.state is not None
        return [
            self.state.key("rl", key, "req"),
            self.state.key("rl", key, "lease"),
            self.state.key("rl", key, "tok"),
        ]

    async def admit(self, key_id: str | None, request_id: str) -> Admission | None:
        """None when the key has no limits; RateLimitError (429, Retry-After) when one is reached."""
        limits = self.limits_for(key_id)
        if limits is None:
            return None
        key = key_id or "anonymous"
        refused: tuple[str, float] | None
        shared = False
        if self.state is not None:
            await self._flush_releases()
            try:
                ok, which, retry_ms = await self.state.call(
                    self.state.script(
                        "admit",
                        self._keys(key),
                        [
                            request_id,
                            limits.requests_per_min or 0,
                            limits.tokens_per_min or 0,
                            limits.concurrent or 0,
                            self.lease_ttl_ms,
                        ],
                    )
                )
                shared = True
                refused = None if int(ok) else (_text(which), max(0.0, float(retry_ms)) / 1000)
            except SharedStateDown:
                self.state.fallback("rate_limit")
                refused = self.local.admit(key, limits)
        else:
            refused = self.local.admit(key, limits)
        if refused is not None:
            which_limit, wait = refused
            self.rejected[which_limit] = self.rejected.get(which_limit, 0) + 1
            raise RateLimitError(
                f"rate limit reached for this API key ({which_limit.replace('_', ' ')})",
                code="rate_limit_exceeded",
                retry_after_s=max(1.0, wait),
            )
        return Admission(key, request_id, shared, limits.concurrent is not None)

    async def release(self, admission: Admission | None) -> None:
        """End a request's concurrency lease. With Redis the ZREM is always sent, also for an
        admission that fell back locally (its ADMIT may have run with the reply lost); one that
        fails is queued and retried once Redis answers."""
        if admission is None or not admission.concurrent:
            return
        if not admission.shared:
            self.local.release(admission.key)
        if self.state is None:
            return
        self._unreleased.append((self._keys(admission.key)[1], admission.request_id))
        await self._flush_releases()

    def add_tokens(self, key_id: str | None, tokens: int) -> None:
        """Count a finished request's tokens (called by an observer, on the event loop)."""
        limits = self.limits_for(key_id)
        if limits is None or limits.tokens_per_min is None or tokens <= 0:
            return
        key = key_id or "anonymous"
        if self.state is None:
            self.local.add_tokens(key, tokens)
            return
        state = self.state

        async def add() -> None:
            try:
                await state.call(state.script("add_tokens", [self._keys(key)[2]], [tokens]))
            except SharedStateDown:
                self.local.add_tokens(key, tokens)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.local.add_tokens(key, tokens)
            return
        state.spawn(add())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
