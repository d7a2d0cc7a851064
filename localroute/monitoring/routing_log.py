"""The routing log's writer: one row per request (successes, 4xx/5xx errors, streams,
disconnects), in SQLite (a path, sqlite_store.py) or PostgreSQL (`routing_log_url`,
postgres_log.py). Its reader and the summaries `localroute report` prints are log_report.py's.

- One store interface for both engines (`LogStore`: `SQLiteLogStore`, `PostgresLogStore`), opened
  by `open_store(target)`; feedback, stored Responses, reports and training go through it too. The
  rows it takes are the writer's: `COLUMNS` (requests) and `PAIR_COLUMNS` (shadow_pairs).
- Named, ordered migrations recorded in `_migrations`, the same names on both engines
  (sqlite_store.MIGRATIONS, postgres_log.POSTGRES_MIGRATIONS); an old log is upgraded in place on open.
- Rows are built on the response path (cheap: numbers and a little JSON) and written in batches
  by one writer thread (`routing_log_batch_s`); `close()` drains the queue, so a completed
  response's row is not lost on shutdown.
- Shadow pairs (monitoring/shadow.py, `add_pairs`) take the same way: queued, batched with the
  request rows, spilled and replayed.
- A batch the store refuses (PostgreSQL down, a locked disk) is appended to a local spill file
  (`routing_log_spill_path`, fsynced) and replayed in order once the store takes writes again;
  the PostgreSQL insert ignores a row already stored, so a replay never doubles one.
- Prompt and answer text are not stored unless `log_prompts` is on, and then with obvious secrets
  (API keys, bearer tokens, private keys, passwords) redacted.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from localroute.monitoring.sqlite_store import MIGRATIONS, SQLiteLogStore
from localroute.redaction import redact
from localroute.routing.base import finite

if TYPE_CHECKING:
    from localroute.monitoring.cost import RequestCost
    from localroute.monitoring.record import RequestRecord
    from localroute.monitoring.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "PAIR_COLUMNS", "LogStore", "RoutingLog", "open_store"]

# the requests columns a writer fills (`RoutingLog.row` builds the rows)

COLUMNS = (
    "ts", "request_id", "endpoint", "policy", "stream", "status", "error", "tier", "escalated", "degraded",
    "signal", "confidence", "attempts", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s", "cost_usd",
    "counterfactual_cost_usd", "energy_j", "gpu_utilization_ratio", "gpu_power_w", "disconnected",
    "prompt_text", "answer_text", "evidence",
)

# the shadow_pairs columns a writer fills (monitoring/shadow.py builds the rows)
PAIR_COLUMNS = ("ts", "request_id", "category", "tier", "confidence", "threshold", "sample_rate", "stratum",
                "status", "scorer", "score", "agrees", "error", "cost_usd", "frontier_latency_s")

# tables the writer appends to: a queued or spilled row names one (requests when it names none)
TABLES = ("requests", "shadow_pairs")


# ---------- the store interface ----------


class LogStore(Protocol):
    """What the writer, feedback, stored Responses, reports and training need from the log's database."""

    engine: str

    @property
    def target(self) -> str: ...

    def migrate(self) -> list[str]: ...

    def insert(self, rows: Sequence[Sequence[Any]]) -> None: ...

    def insert_pairs(self, rows: Sequence[Sequence[Any]]) -> None: ...

    def prune(self, retention_days: float | None) -> int: ...

    def latest_request(self, request_id: str) -> tuple[str | None, str | None] | None: ...

    def add_feedback(self, ts: float, request_id: str, score: float, correct: int | None, source: str) -> int: ...

    def mark_review(self, request_id: str, ts: float, policy: str, tier: str | None) -> None: ...

    def put_response(self, response_id: str, ts: float, response: str, messages: str,
                     retention_days: float | None = None) -> None:
        """Store a Responses object and its conversation's messages (JSON text, response_store.py).
        SQLite deletes those past `retention_days` here; PostgreSQL drops their day partitions in `prune`."""
        ...

    def get_response(self, response_id: str) -> tuple[str, str] | None:
        """The (response, messages) JSON text stored under `response_id`, or None."""
        ...

    def read_requests(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]: ...

    def count_requests(self) -> int: ...

    def review_queue(self, pending_only: bool = True, limit: int = 100) -> list[tuple[Any, ...]]: ...

    def labelled(self) -> list[tuple[Any, ...]]: ...

    def read_shadow_pairs(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]: ...

    def permanent(self, exc: BaseException) -> bool:
        """Whether an insert's error is about its rows (refused on every retry), not the store."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def open_store(target: str | Path, read_only: bool = False) -> LogStore:
    """The store for a postgresql:// URL or a SQLite path (not yet connected)."""
    from localroute.monitoring.postgres_log import PostgresLogStore, is_postgres_url

    if is_postgres_url(target):
        return PostgresLogStore(str(target), COLUMNS, [name for name, _ in MIGRATIONS], PAIR_COLUMNS)
    return SQLiteLogStore(Path(target), COLUMNS, PAIR_COLUMNS, read_only=read_only)


# ---------- the writer ----------


class RoutingLog:
    """Observer of finished requests (`observe`) that appends rows through a writer thread.
    `target`: a SQLite path or a postgresql:// URL."""

    def __init__(self, target: str | Path, retention_days: float | None = None, log_prompts: bool = False,
                 telemetry: Telemetry | None = None, spill_path: Path | None = None, batch_s: float = 0.0) -> None:
        self.store = open_store(target)
        self.path = Path(target) if self.store.engine == "sqlite" else None
        self.retention_days = retention_days
        self.log_prompts = log_prompts
        self.telemetry = telemetry
        self.batch_s = batch_s
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self.spilled_total = 0
        self.replayed_total = 0
        self.rejected_total = 0  # rows the store refused for their contents (set aside, not retried)
        try:  # migrate now, so a bad target fails at start-up, not on a request
            self.applied = self.store.migrate()
            self.store.prune(self.retention_days)
        except Exception:
            if self.store.engine == "sqlite" or self.spill_path is None:
                raise
            # PostgreSQL down at start-up: serve anyway, spill, migrate when it is back
            log.exception("routing log %s unavailable at start-up; rows spill to %s", self.store.target,
                          self.spill_path)
            self.store.reset()
            self.applied = []
            self._migrated = False
        else:
            self._migrated = True
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # the store and the spill file: the writer's, or close()'s
        if self.store.engine == "sqlite":
            self.store.close()  # the writer thread opens its own
        self._thread = threading.Thread(target=self._writer, name="localroute-routing-log", daemon=True)
        self._thread.start()

    def __call__(self, rec: RequestRecord) -> None:
        self.observe(rec)

    def observe(self, rec: RequestRecord) -> None:
        """Build the row now (cheap) and queue it; never raises into the request."""
        if self._closed:
            log.warning("routing log closed; row for %s written synchronously", rec.request_id)
            self._write_now([("requests", self.row(rec))])
            return
        self._queue.put(("requests", self.row(rec)))

    def add_pairs(self, rows: Sequence[Sequence[Any]]) -> None:
        """Queue shadow_pairs rows (PAIR_COLUMNS, monitoring/shadow.py) for the writer: batched with
        the request rows, spilled and replayed as they are. Never waits on the database."""
        items = [("shadow_pairs", tuple(r)) for r in rows]
        if self._closed:
            log.warning("routing log closed; %d shadow pairs written synchronously", len(items))
            self._write_now(items)
            return
        for item in items:
            self._queue.put(item)

    def row(self, rec: RequestRecord) -> tuple[Any, ...]:
        cost: RequestCost | None = rec.extra.get("cost")
        decision, gen = rec.decision, rec.generation
        per_attempt = cost.attempts if cost is not None else []
        attempts = []
        if decision is not None:
            for i, a in enumerate(decision.attempts):
                ac = per_attempt[i] if i < len(per_attempt) else None
                attempts.append({
                    **a.as_dict(),
                    "cost_usd": ac.cost_usd if ac is not None else None,
                    "cost_method": ac.method if ac is not None else None,
                    "energy_j": ac.energy_j if ac is not None else None,
                })
        gpus = self.telemetry.gpus() if self.telemetry is not None else []
        utils = [g.utilization_ratio for g in gpus if g.utilization_ratio is not None]
        powers = [g.power_w for g in gpus if g.power_w is not None]
        prompt_text = answer_text = None
        if self.log_prompts:
            request = rec.extra.get("request")
            if request is not None:
                prompt_text = redact(_request_text(request))
            if gen is not None:
                answer_text = redact(gen.text)
        ts = time.time() - max(0.0, time.perf_counter() - rec.started_at)
        return (
            ts, rec.request_id, rec.endpoint, rec.policy, int(rec.stream), rec.status_code, rec.error,
            (decision.answered_by or None) if decision is not None else None,
            int(decision.escalated) if decision is not None else None,
            decision.degraded if decision is not None else None,
            decision.signal if decision is not None else None,
            finite(decision.confidence) if decision is not None else None,
            json.dumps(attempts),
            gen.prompt_tokens if gen is not None else None,
            gen.completion_tokens if gen is not None else None,
            rec.ttft_s, rec.latency_s,
            cost.cost_usd if cost is not None else None,
            cost.counterfactual_cost_usd if cost is not None else None,
            cost.energy_j if cost is not None else None,
            sum(utils) / len(utils) if utils else None,
            sum(powers) if powers else None,
            int(rec.disconnected), prompt_text, answer_text,
            json.dumps(self._evidence(decision.evidence), default=str)
            if decision is not None and decision.evidence else None,
        )

    def _evidence(self, evidence: dict[str, Any]) -> dict[str, Any]:
        """The decision's evidence, without answer text unless log_prompts (then redacted): the
        repetition check's evidence quotes the repeated phrase."""
        loops = evidence.get("repetition")
        if not loops:
            return evidence
        kept = {tier: ({**e, "ngram": redact(str(e.get("ngram", "")))} if self.log_prompts
                       else {k: v for k, v in e.items() if k != "ngram"}) for tier, e in loops.items()}
        return {**evidence, "repetition": kept}

    def _writer(self) -> None:
        last_prune = time.monotonic()
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=1.0 if self._spilled() else None)
            except queue.Empty:
                with self._lock:
                    self._replay()
                continue
            batch = [item]
            deadline = time.monotonic() + self.batch_s
            while len(batch) < 512:
                try:
                    left = deadline - time.monotonic()
                    batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [r for r in batch if r is not None]
            stop = any(r is None for r in batch)
            try:
                with self._lock:
                    if rows:
                        self._write(rows)
                    if time.monotonic() - last_prune > 3600 and self._migrated:
                        self.store.prune(self.retention_days)
                        last_prune = time.monotonic()
            except Exception:
                log.exception("routing log maintenance failed")
            finally:
                for _ in batch:
                    self._queue.task_done()
        with self._lock:
            self.store.close()

    def _insert(self, items: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Insert (table, row) items: the request rows, then the shadow pairs, each in order, in
        transactions of up to 512 rows. On an error the exception's `pending` holds the items not
        stored (so a spill does not store a committed part twice)."""
        by_table = {t: [r for tt, r in items if tt == t] for t in TABLES}
        stored = dict.fromkeys(TABLES, 0)
        try:
            if not self._migrated:
                self.applied = self.store.migrate()
                self._migrated = True
            for table, insert in (("requests", self.store.insert), ("shadow_pairs", self.store.insert_pairs)):
                rows = by_table[table]
                for i in range(0, len(rows), 512):
                    chunk = rows[i:i + 512]
                    try:
                        insert(chunk)
                    except Exception as exc:
                        if not self.store.permanent(exc):
                            raise
                        self.store.reset()
                        self._one_by_one(table, insert, chunk)
                    stored[table] = min(len(rows), i + 512)
        except Exception as exc:
            exc.pending = [(t, r) for t in TABLES for r in by_table[t][stored[t]:]]  # type: ignore[attr-defined]
            raise

    def _one_by_one(self, table: str, insert: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """A batch the store refused for its contents: each row alone, and those refused again set
        aside in `<spill file>.rejected` (or dropped, counted and logged, without a spill file),
        so one bad row never holds up the rest, now or on every replay."""
        for row in rows:
            try:
                insert([row])
            except Exception as exc:
                if not self.store.permanent(exc):
                    raise
                self.store.reset()
                self.rejected_total += 1
                if self.spill_path is not None:
                    _append_lines(self.spill_path.with_name(self.spill_path.name + ".rejected"), [(table, row)])
                log.error("routing log %s refused a %s row (%s); set aside", self.store.target, table,
                          type(exc).__name__)

    def _write(self, items: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Insert (after any spilled rows, to keep their order), or spill."""
        if self._spilled() and not self._replay():
            self._spill(items)
            return
        try:
            self._insert(items)
        except Exception as exc:
            self.store.reset()
            pending = getattr(exc, "pending", items)
            if self.spill_path is None:
                log.exception("routing log write failed (%d rows lost)", len(pending))
                return
            log.warning("routing log %s unavailable (%s); %d rows spilled to %s", self.store.target,
                        type(exc).__name__, len(pending), self.spill_path)
            self._spill(pending)

    def _spilled(self) -> bool:
        return self.spill_path is not None and self.spill_path.is_file() and self.spill_path.stat().st_size > 0

    def _spill(self, items: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Append items to the spill file: a request row as a JSON list (the format before shadow
        pairs were spilled too), another table's row as {"table": row}."""
        assert self.spill_path is not None
        _append_lines(self.spill_path, items)
        self.spilled_total += len(items)

    def _replay(self) -> bool:
        """Write the spill file's rows; True when it is empty afterwards."""
        if not self._spilled():
            return True
        assert self.spill_path is not None
        lines = self.spill_path.read_text(encoding="utf-8").splitlines()
        rows: list[tuple[str, tuple[Any, ...]]] = []
        for line in lines:
            try:
                value = json.loads(line)
            except ValueError:  # a line cut by a crash mid-write
                log.warning("routing log spill: skipping an unreadable line")
                continue
            if isinstance(value, list):
                rows.append(("requests", tuple(value)))
            elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in TABLES:
                table, row = next(iter(value.items()))
                rows.append((table, tuple(row)))
            else:
                log.warning("routing log spill: skipping a line of an unknown shape")
        try:
            self._insert(rows)
        except Exception as exc:
            self.store.reset()
            pending = getattr(exc, "pending", rows)
            if len(pending) < len(rows):  # keep only what is not stored yet
                tmp = self.spill_path.with_name(self.spill_path.name + ".tmp")
                tmp.unlink(missing_ok=True)
                _append_lines(tmp, pending)
                os.replace(tmp, self.spill_path)
            return False
        self.spill_path.write_text("", encoding="utf-8")
        self.replayed_total += len(rows)
        log.info("routing log: %d spilled rows replayed into %s", len(rows), self.store.target)
        return True

    def _write_now(self, items: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._write(items)

    def flush(self) -> None:
        """Block until every queued row is on disk."""
        self._queue.join()

    def close(self) -> None:
        """Drain and stop the writer; rows observed after this are written synchronously."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=60)
        leftover = []
        while True:  # the writer died: do its work here rather than drop rows
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftover.append(item)
        with self._lock:
            if leftover:
                self._write(leftover)
            self._replay()  # a last try; what stays spilled is replayed by the next start
            self.store.close()

    def stats(self) -> dict[str, Any]:
        return {"engine": self.store.engine, "spilled_total": self.spilled_total,
                "replayed_total": self.replayed_total, "rejected_total": self.rejected_total,
                "spill_pending": self._spilled()}


def _append_lines(path: Path, items: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Spill file lines, fsynced: a request row as a JSON list, another table's as {table: row}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(list(r) if t == "requests" else {t: list(r)}) + "\n" for t, r in items)
        f.flush()
        os.fsync(f.fileno())


def _request_text(request: Any) -> str:
    messages = getattr(request, "messages", None)
    if messages:
        return "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in messages)
    return str(getattr(request, "prompt", "") or "")
