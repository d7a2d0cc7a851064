"""An optional cap on frontier spend, per period and per API key.

Why reserve-then-reconcile: the cost of a frontier call is known only after it ends, and many
escalations run at once. Checking "spent < cap" before each call lets N concurrent calls all pass
and overshoot by N calls. Instead each call atomically reserves its worst-case cost (every prompt
byte a token, max_tokens of output) and is refused if spent + reserved + its reservation would
pass the cap; when it ends, the reservation is replaced by the provider-reported cost. Spend can
then pass the cap only if a call costs more than its own worst case, i.e. by at most one
reservation under any concurrency.

Spend is counted for the current UTC calendar period (hour, day, ISO week or month) and resets
when the period rolls over. Where it lives:

- one node: in memory, each settled call also added to a small SQLite file (`budget_state_path`),
  so a restart remembers what the period has spent (`SpendBudget` with a `SpendStore`);
- several replicas (`redis_url`): in Redis (`SharedSpendBudget`), reserved and settled by Lua
  scripts that run atomically, so the cap holds across every replica; each hold carries a TTL, so
  the holds of a replica that crashed expire. When Redis does not answer in time,
  `shared_state_failure` decides: fail_open reserves against this process's counters (starting
  from the last spend Redis reported, the call's charge replayed to Redis once it is back),
  fail_closed refuses with 503.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from localroute.errors import BudgetExceededError

if TYPE_CHECKING:
    from localroute.shared_state import SharedState

log = logging.getLogger(__name__)

__all__ = [
    "Budget",
    "BudgetExceededError",
    "Reservation",
    "SharedSpendBudget",
    "SpendBudget",
    "SpendMeter",
    "SpendStore",
    "current_key_id",
    "current_meter",
]

NANO = 1e9  # Redis keeps nano-USD integers: exact sums, no float drift across replicas

# The key id of the request being served (None when auth is off): set by the HTTP edge's auth
# middleware (server/auth.py), read by per-key budgets.
current_key_id: ContextVar[str | None] = ContextVar("localroute_key_id", default=None)


@dataclass(slots=True)
class SpendMeter:
    """What the remote calls made while it is `current_meter` were charged, summed (a call that
    failed too: one billed without usage is charged what its backend settles it at). A caller
    that must record what a call cost the budget (a shadow pair) sets one around the call; a task
    started meanwhile (asyncio.wait_for's, on Python 3.11) shares the same meter object."""

    usd: float = 0.0
    calls: int = 0

    def add(self, usd: float) -> None:
        self.usd += usd
        self.calls += 1


current_meter: ContextVar[SpendMeter | None] = ContextVar("localroute_spend_meter", default=None)

Period = Literal["hour", "day", "week", "month"]


def _period_bounds(now: float, period: Period) -> tuple[str, float]:
    """A label for the period containing `now` and the epoch second it ends."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "week":
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=7)
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    return start.isoformat(), end.timestamp()


class Budget(Protocol):
    """What a remote tier needs from a budget (in-process or shared)."""

    async def areserve(self, amount_usd: float, key_id: str | None = None) -> Any: ...

    def snapshot(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class Reservation:
    """A worst-case hold on the budget; `settle` swaps it for the actual cost, once."""

    budget: SpendBudget
    amount_usd: float
    key_id: str | None
    period: str
    settled: bool = field(default=False)

    def settle(self, actual_usd: float) -> None:
        self.budget._persist(self.budget._settle(self, max(0.0, actual_usd)))

    async def asettle(self, actual_usd: float) -> None:
        """The books change at once; the SQLite write runs in a thread, off the event loop."""
        write = self.budget._settle(self, max(0.0, actual_usd))
        if write is not None:
            await asyncio.to_thread(self.budget._persist, write)


class SpendStore:
    """The spend of each period (global and per key) in SQLite: a single node's restart
    remembers it. One row per (period, scope), added to on every settle. Writes run in a worker
    thread (`Reservation.asettle`), one at a time (a lock: one connection), waiting at most
    `busy_timeout_s` for another writer of the file; a write that fails is logged, the spend kept
    in memory."""

    def __init__(self, path: Path, busy_timeout_s: float = 2.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS budget_spend (period TEXT NOT NULL, scope TEXT NOT NULL, "
            "spent_usd REAL NOT NULL, PRIMARY KEY (period, scope))"
        )

    def load(self, period: str) -> dict[str, float]:
        """scope -> spent; scope '' is the global total, others are key ids."""
        with self._lock:
            return {
                r[0]: float(r[1])
                for r in self._conn.execute(
                    "SELECT scope, spent_usd FROM budget_spend WHERE period = ?", (period,)
                )
            }

    def add(self, period: str, amounts: dict[str, float]) -> None:
        with self._lock:
            self._conn.executemany(
                "INSERT INTO budget_spend (period, scope, spent_usd) VALUES (?, ?, ?) "
                "ON CONFLICT (period, scope) DO UPDATE SET spent_usd = spent_usd + excluded.spent_usd",
                [(period, scope, amount) for scope, amount in amounts.items()],
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SpendBudget:
    """Global and per-key caps over one period. All bookkeeping happens under one lock, so a
    reservation is atomic even when called from several threads. With a `store`, settled spend
    is written through to SQLite and read back at start-up (and at each period's start)."""

    def __init__(
        self,
        cap_usd: float | None,
        per_key_usd: float | None = None,
        period: Period = "day",
        clock: Callable[[], float] = time.time,
        store: SpendStore | None = None,
    ) -> None:
        self.cap_usd = cap_usd
        self.per_key_usd = per_key_usd
        self.period = period
        self._clock = clock
        self._lock = threading.Lock()
        self.store = store
        self._label, self._ends_at = _period_bounds(clock(), period)
        self._spent = 0.0
        self._reserved = 0.0
        self._key_spent: dict[str, float] = {}
        self._key_reserved: dict[str, float] = {}
        self.rejected_total = 0
        self._load()

    def _load(self) -> None:
        if self.store is None:
            return
        saved = self.store.load(self._label)
        self._spent = saved.pop("", 0.0)
        self._key_spent = saved

    def _roll(self) -> None:
        now = self._clock()
        if now >= self._ends_at:
            self._label, self._ends_at = _period_bounds(now, self.period)
            self._spent = self._reserved = 0.0
            self._key_spent.clear()
            self._key_reserved.clear()
            self._load()

    async def areserve(self, amount_usd: float, key_id: str | None = None) -> Reservation:
        return self.reserve(amount_usd, key_id)

    def reserve(self, amount_usd: float, key_id: str | None = None) -> Reservation:
        """Hold `amount_usd` or raise BudgetExceededError (429, Retry-After: the period's end)."""
        amount = max(0.0, amount_usd)
        with self._lock:
            self._roll()
            over_global = self.cap_usd is not None and self._spent + self._reserved + amount > self.cap_usd
            over_key = (
                key_id is not None
                and self.per_key_usd is not None
                and self._key_spent.get(key_id, 0.0) + self._key_reserved.get(key_id, 0.0) + amount
                > self.per_key_usd
            )
            if over_global or over_key:
                self.rejected_total += 1
                wait = max(1.0, self._ends_at - self._clock())
                scope = "this API key's" if over_key and not over_global else "the"
                raise BudgetExceededError(
                    f"{scope} frontier budget for this {self.period} is spent", retry_after_s=wait
                )
            self._reserved += amount
            if key_id is not None:
                self._key_reserved[key_id] = self._key_reserved.get(key_id, 0.0) + amount
            return Reservation(self, amount, key_id, self._label)

    def _settle(self, res: Reservation, actual: float) -> tuple[str, dict[str, float]] | None:
        """Update the books; returns the write for the store (None: nothing to persist)."""
        with self._lock:
            if res.settled:
                return None
            res.settled = True
            if res.period != self._label:  # the period rolled over meanwhile: its books are closed
                return None
            self._reserved = max(0.0, self._reserved - res.amount_usd)
            self._spent += actual
            if res.key_id is not None:
                k = res.key_id
                self._key_reserved[k] = max(0.0, self._key_reserved.get(k, 0.0) - res.amount_usd)
                self._key_spent[k] = self._key_spent.get(k, 0.0) + actual
            if self.store is None or actual <= 0:
                return None
            return res.period, {"": actual, **({res.key_id: actual} if res.key_id else {})}

    def _persist(self, write: tuple[str, dict[str, float]] | None) -> None:
        if write is None or self.store is None:
            return
        try:
            self.store.add(*write)
        except sqlite3.Error:
            log.exception("budget: could not persist spend (kept in memory)")

    def charge(self, actual_usd: float, key_id: str | None = None) -> None:
        """Count spend that was not reserved here (another replica's, replayed)."""
        self._persist(self._settle(Reservation(self, 0.0, key_id, self._label), max(0.0, actual_usd)))

    def seed(self, spent_usd: float) -> None:
        """Start from a known total (the last one shared state reported), if it is higher."""
        with self._lock:
            self._roll()
            self._spent = max(self._spent, spent_usd)

    def spent_usd(self, key_id: str | None = None) -> float:
        with self._lock:
            self._roll()
            return self._key_spent.get(key_id, 0.0) if key_id is not None else self._spent

    def reserved_usd(self) -> float:
        with self._lock:
            return self._reserved

    def snapshot(self) -> dict[str, Any]:
        """For /health and reports: no key ids, only totals."""
        with self._lock:
            self._roll()
            return {
                "period": self._label,
                "cap_usd": self.cap_usd,
                "per_key_usd": self.per_key_usd,
                "spent_usd": round(self._spent, 6),
                "reserved_usd": round(self._reserved, 6),
                "rejected_total": self.rejected_total,
            }


@dataclass(slots=True)
class SharedReservation:
    """A hold in Redis (or, when Redis failed under fail_open, in the local fallback)."""

    budget: SharedSpendBudget
    rid: str
    amount_usd: float
    key_id: str | None
    period: str
    local: Reservation | None = None
    settled: bool = field(default=False)

    async def asettle(self, actual_usd: float) -> None:
        """Settle off the request path: the hold stays counted (it is at least the actual cost)
        until Redis has the charge, so the cap holds meanwhile."""
        if self.settled:
            return
        self.settled = True
        self.budget.state.spawn(self.budget._asettle(self, max(0.0, actual_usd)))


class SharedSpendBudget:
    """The cap across every replica, in Redis (module docstring). Holds expire after `hold_ttl_s`
    (a crashed replica's too): keep it above the longest frontier call (`frontier_timeout_s`)."""

    def __init__(
        self,
        state: SharedState,
        cap_usd: float | None,
        per_key_usd: float | None = None,
        period: Period = "day",
        hold_ttl_s: float = 150.0,
        clock: Callable[[], float] = time.time,
        namespace: str = "budget",
    ) -> None:
        """`namespace`: the Redis key space (and the fallback counter's part): another cap counted
        apart from the serving budget, such as the shadow budget ("shadow_budget"), takes its own."""
        self.state = state
        self.namespace = namespace
        self.cap_usd = cap_usd
        self.per_key_usd = per_key_usd
        self.period = period
        self.hold_ttl_ms = int(hold_ttl_s * 1000)
        self._clock = clock
        self.fallback = SpendBudget(cap_usd, per_key_usd, period, clock)
        self._last_committed = 0.0
        # charges (and fail_closed releases) to replay: rid, actual, key id, period label, when
        self._pending: deque[tuple[str, float, str | None, str, float]] = deque()
        self._replay_lock = asyncio.Lock()
        self._replaying = False
        self.rejected_total = 0

    def _keys(self, label: str, key_id: str | None) -> list[str]:
        scopes = ["all"] + ([f"key:{key_id}"] if key_id is not None else [])
        return [self.state.key(self.namespace, label, scope, part) for scope in scopes for part in ("b", "h", "a")]

    def _limits(self, key_id: str | None) -> list[int]:
        out = [int(self.cap_usd * NANO) if self.cap_usd is not None else -1]
        if key_id is not None:
            out.append(int(self.per_key_usd * NANO) if self.per_key_usd is not None else -1)
        return out

    async def areserve(self, amount_usd: float, key_id: str | None = None) -> SharedReservation:
        amount = max(0.0, amount_usd)
        label, ends_at = _period_bounds(self._clock(), self.period)
        rid = uuid.uuid4().hex
        from localroute.shared_state import SharedStateDown

        self._start_replay()
        attempted = self.state.up
        try:
            ok, value = await self.state.call(
                self.state.script(
                    "reserve",
                    self._keys(label, key_id),
                    [rid, int(amount * NANO), self.hold_ttl_ms, int(ends_at) + 86400, *self._limits(key_id)],
                )
            )
        except SharedStateDown:
            if attempted and self.state.failure == "fail_closed":
                # The script may have run with its reply lost: release that hold (a settle of 0,
                # a no-op if it never ran) rather than leave it counted for hold_ttl. Under
                # fail_open the local reservation's replayed settle of this rid does the same.
                self.state.spawn(self._asettle(SharedReservation(self, rid, amount, key_id, label), 0.0))
            self.state.fallback(self.namespace, retry_after_s=None)  # fail_closed raises the 503 here
            self.fallback.seed(self._last_committed)
            local = self.fallback.reserve(amount, key_id)
            return SharedReservation(self, rid, amount, key_id, label, local=local)
        if not int(ok):
            self.rejected_total += 1
            scope = "this API key's" if int(value) == 1 else "the"
            raise BudgetExceededError(
                f"{scope} frontier budget for this {self.period} is spent",
                retry_after_s=max(1.0, ends_at - self._clock()),
            )
        if int(value) >= 0:
            self._last_committed = int(value) / NANO
        return SharedReservation(self, rid, amount, key_id, label)

    async def _asettle(self, res: SharedReservation, actual: float) -> None:
        if res.local is not None:  # reserved locally during an outage: settle there, replay the charge
            res.local.settle(actual)
            if actual > 0:
                self._pending.append((res.rid, actual, res.key_id, res.period, self._clock()))
            return
        if not await self._send_settle(res.rid, actual, res.key_id, res.period):
            self._pending.append((res.rid, actual, res.key_id, res.period, self._clock()))

    async def _send_settle(self, rid: str, actual: float, key_id: str | None, label: str) -> bool:
        from localroute.shared_state import SharedStateDown

        _, ends_at = _period_bounds(self._clock(), self.period)
        try:
            await self.state.call(
                self.state.script(
                    "settle", self._keys(label, key_id), [rid, int(actual * NANO), int(ends_at) + 86400]
                )
            )
        except SharedStateDown:
            return False
        return True

    def _start_replay(self) -> None:
        """Replay pending charges in one background task (never on the request path), at most one
        running at a time."""
        if self._pending and self.state.up and not self._replaying:
            self._replaying = True
            self.state.spawn(self._replay())

    async def _replay(self) -> None:
        """Charges settled while Redis was away, sent once it answers again. One drain at a time
        (the lock); each entry is taken off the queue before its send and put back at the front if
        the send fails, so concurrent drains can neither lose nor repeat a charge (a settle that
        did reach Redis but is sent again is a no-op: its 'done' marker lasts the period)."""
        try:
            async with self._replay_lock:
                while self._pending and self.state.up:
                    entry = self._pending.popleft()
                    rid, actual, key_id, label, _ = entry
                    if not await self._send_settle(rid, actual, key_id, label):
                        self._pending.appendleft(entry)
                        return
        finally:
            self._replaying = False

    async def aspent_usd(self, key_id: str | None = None) -> float:
        """The period's settled spend in Redis (global, or one key's)."""
        label, _ = _period_bounds(self._clock(), self.period)
        keys = self._keys(label, key_id)
        key = keys[3] if key_id is not None else keys[0]
        state = self.state
        value = await state.call(lambda: state.client.hget(key, "spent"))
        return int(value or 0) / NANO

    async def areserved_usd(self) -> float:
        """Held now, after reaping the holds whose TTL passed (a crashed replica's)."""
        label, ends_at = _period_bounds(self._clock(), self.period)
        keys = self._keys(label, None)
        await self.state.call(self.state.script("reserve", keys, ["reap", -1, 0, int(ends_at) + 86400, -1]))
        key = keys[0]
        state = self.state
        value = await state.call(lambda: state.client.hget(key, "held"))
        return int(value or 0) / NANO

    async def asnapshot(self) -> dict[str, Any]:
        from localroute.shared_state import SharedStateDown

        snap = {
            "period": _period_bounds(self._clock(), self.period)[0],
            "cap_usd": self.cap_usd,
            "per_key_usd": self.per_key_usd,
            "rejected_total": self.rejected_total,
            "shared": True,
            "pending_replays": len(self._pending),
        }
        try:
            snap["spent_usd"] = round(await self.aspent_usd(), 6)
            snap["reserved_usd"] = round(await self.areserved_usd(), 6)
        except SharedStateDown:
            snap["spent_usd"] = snap["reserved_usd"] = None
        return snap

    def snapshot(self) -> dict[str, Any]:
        return {
            "period": _period_bounds(self._clock(), self.period)[0],
            "cap_usd": self.cap_usd,
            "per_key_usd": self.per_key_usd,
            "rejected_total": self.rejected_total,
            "shared": True,
            "last_committed_usd": round(self._last_committed, 6),
            "pending_replays": len(self._pending),
        }
