"""An optional cap on frontier spend, per period and per API key.

Why reserve-then-reconcile: the cost of a frontier call is known only after it ends, and many
escalations run at once. Checking "spent < cap" before each call lets N concurrent calls all pass
and overshoot by N calls. Instead each call atomically reserves its worst-case cost (every prompt
byte a token, max_tokens of output) and is refused if spent + reserved + its reservation would
pass the cap; when it ends, the reservation is replaced by the provider-reported cost. Spend can
then pass the cap only if a call costs more than its own worst case, i.e. by at most one
reservation under any concurrency.

Spend is kept in memory for the current UTC calendar period (hour, day, ISO week or month) and
resets when the period rolls over; a restart resets it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from localroute.errors import BudgetExceededError

if TYPE_CHECKING:
    pass

__all__ = ["BudgetExceededError", "Reservation", "SpendBudget", "current_key_id"]

# The key id of the request being served (None when auth is off): set by the HTTP edge's auth
# middleware (server/auth.py), read by per-key budgets.
current_key_id: ContextVar[str | None] = ContextVar("localroute_key_id", default=None)

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
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.isoformat(), end.timestamp()


@dataclass(slots=True)
class Reservation:
    """A worst-case hold on the budget; `settle` swaps it for the actual cost, once."""

    budget: SpendBudget
    amount_usd: float
    key_id: str | None
    period: str
    settled: bool = field(default=False)

    def settle(self, actual_usd: float) -> None:
        self.budget._settle(self, max(0.0, actual_usd))


class SpendBudget:
    """Global and per-key caps over one period. All bookkeeping happens under one lock, so a
    reservation is atomic even when called from several threads."""

    def __init__(
        self,
        cap_usd: float | None,
        per_key_usd: float | None = None,
        period: Period = "day",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cap_usd = cap_usd
        self.per_key_usd = per_key_usd
        self.period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._label, self._ends_at = _period_bounds(clock(), period)
        self._spent = 0.0
        self._reserved = 0.0
        self._key_spent: dict[str, float] = {}
        self._key_reserved: dict[str, float] = {}
        self.rejected_total = 0

    def _roll(self) -> None:
        now = self._clock()
        if now >= self._ends_at:
            self._label, self._ends_at = _period_bounds(now, self.period)
            self._spent = self._reserved = 0.0
            self._key_spent.clear()
            self._key_reserved.clear()

    def reserve(self, amount_usd: float, key_id: str | None = None) -> Reservation:
        """Hold `amount_usd` or raise BudgetExceededError (429, Retry-After: the period's end)."""
        amount = max(0.0, amount_usd)
        with self._lock:
            self._roll()
            over_global = self.cap_usd is not None and self._spent + self._reserved + amount > self.cap_usd
            over_key = (
                key_id is not None
                and self.per_key_usd is not None
                and self._key_spent.get(key_id, 0.0) + self._key_reserved.get(key_id, 0.0) + amount > self.per_key_usd
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

    def _settle(self, res: Reservation, actual: float) -> None:
        with self._lock:
            if res.settled:
                return
            res.settled = True
            if res.period != self._label:  # the period rolled over meanwhile: its books are closed
                return
            self._reserved = max(0.0, self._reserved - res.amount_usd)
            self._spent += actual
            if res.key_id is not None:
                k = res.key_id
                self._key_reserved[k] = max(0.0, self._key_reserved.get(k, 0.0) - res.amount_usd)
                self._key_spent[k] = self._key_spent.get(k, 0.0) + actual

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
            return {"period": self._label, "cap_usd": self.cap_usd, "per_key_usd": self.per_key_usd,
                    "spent_usd": round(self._spent, 6), "reserved_usd": round(self._reserved, 6),
                    "rejected_total": self.rejected_total}


