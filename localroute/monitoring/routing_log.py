"""The routing log's writer: one row per request (successes, 4xx/5xx errors, streams,
disconnects), in SQLite (a path) or PostgreSQL (`routing_log_url`, postgres_log.py). Its reader and
the summaries `localroute report` prints are log_report.py's.

- One store interface for both engines (`SQLiteLogStore` here, `PostgresLogStore`), opened by
  `open_store(target)`; feedback, reports and training read through it too.
- SQLite: WAL mode, so `localroute report` can read while the server writes.
- Named, ordered migrations recorded in `_migrations`; an old log is upgraded in place on open.
  PostgreSQL has the same names (postgres_log.POSTGRES_MIGRATIONS), each in its own dialect.
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
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from localroute.monitoring.postgres_log import SHADOW_PAIRS_SQL
from localroute.redaction import redact
from localroute.routing.base import finite

if TYPE_CHECKING:
    from localroute.monitoring.cost import RequestCost
    from localroute.monitoring.record import RequestRecord
    from localroute.monitoring.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "PAIR_COLUMNS", "LogStore", "RoutingLog", "SQLiteLogStore", "migrate", "open_store",
           "redact"]

# (name, SQL). Append only: a released migration is never edited, renamed or reordered.
MIGRATIONS: list[tuple[str, str]] = [
    ("001_create_requests", """
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            endpoint TEXT,
            policy TEXT,
            stream INTEGER NOT NULL DEFAULT 0,
            status INTEGER NOT NULL,
            error TEXT,
            tier TEXT,
            escalated INTEGER,
            degraded TEXT,
            signal TEXT,
            confidence REAL,
            attempts TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_s REAL,
            latency_s REAL,
            cost_usd REAL,
            counterfactual_cost_usd REAL
        );
        CREATE INDEX requests_ts ON requests(ts);
    """),
    ("002_energy_and_gpu", """
        ALTER TABLE requests ADD COLUMN energy_j REAL;
        ALTER TABLE requests ADD COLUMN gpu_utilization_ratio REAL;
        ALTER TABLE requests ADD COLUMN gpu_power_w REAL;
    """),
    ("003_text_and_disconnects", """
        ALTER TABLE requests ADD COLUMN disconnected INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE requests ADD COLUMN prompt_text TEXT;
        ALTER TABLE requests ADD COLUMN answer_text TEXT;
    """),
    # feedback on a logged request (POST /v1/feedback) and the requests sampled for human review
    # (review_sample_rate); both keyed by the requests row's request_id (localroute.monitoring.feedback).
    ("004_feedback_and_review", """
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            score REAL,
            correct INTEGER,
            source TEXT
        );
        CREATE INDEX feedback_request_id ON feedback(request_id);
        CREATE TABLE review_sample (
            request_id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            policy TEXT,
            tier TEXT
        );
        CREATE INDEX requests_request_id ON requests(request_id)
    """),
    # the routing decision's evidence (pre-inference router score, verifier P(Yes), schema violations)
    ("005_decision_evidence", """
        ALTER TABLE requests ADD COLUMN evidence TEXT;
    """),
    # Responses API objects kept for GET /v1/responses/{id} and previous_response_id, with the chat
    # messages of their conversation (localroute.monitoring.response_store)
    ("006_stored_responses", """
        CREATE TABLE responses (
            response_id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            response TEXT NOT NULL,
            messages TEXT NOT NULL
        );
        CREATE INDEX responses_ts ON responses(ts)
    """),
    # shadow evaluation (issue 19, localroute.monitoring.shadow): each locally accepted answer drawn
    # for a frontier comparison, whatever came of the draw (scored, failed, over the shadow budget,
    # dropped); `sample_rate` is the draw's probability (reweighting, recalibration)
    ("007_shadow_pairs", """
        CREATE TABLE shadow_pairs (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            category TEXT NOT NULL,
            tier TEXT NOT NULL,
            confidence REAL,
            threshold REAL,
            sample_rate REAL NOT NULL,
            stratum TEXT,
            status TEXT NOT NULL,
            scorer TEXT,
            score REAL,
            agrees INTEGER,
            error TEXT,
            cost_usd REAL,
            frontier_latency_s REAL
        );
        CREATE INDEX shadow_pairs_ts ON shadow_pairs(ts);
        CREATE INDEX shadow_pairs_category ON shadow_pairs(category, tier)
    """),
    # shadow pairs go through the writer (batched, spilled, replayed) on both engines: one pair per
    # (request_id, ts), so a replayed batch is stored once (PostgreSQL: the table becomes day-partitioned)
    ("008_shadow_pairs_through_store", """
        DELETE FROM shadow_pairs WHERE id NOT IN (SELECT MIN(id) FROM shadow_pairs GROUP BY request_id, ts);
        CREATE UNIQUE INDEX shadow_pairs_request_ts ON shadow_pairs(request_id, ts)
    """),
]

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


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet recorded, in order, each in its own transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in (s.strip() for s in sql.split(";")):
                if statement:
                    conn.execute(statement)
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


# ---------- the stores ----------


class LogStore(Protocol):
    """What the writer, feedback, reports and training need from the log's database."""

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


class SQLiteLogStore:
    """The log in one SQLite file. `read_only` opens without creating or migrating (reports)."""

    engine = "sqlite"

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None

    @property
    def target(self) -> str:
        return str(self.path)

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.read_only:
                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            else:  # as connect(), usable from the writer thread and from close() after it
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                             check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def reset(self) -> None:
        self.close()

    def permanent(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError)

    def migrate(self) -> list[str]:
        return migrate(self.conn())

    def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        self._insert(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows)

    def insert_pairs(self, rows: Sequence[Sequence[Any]]) -> None:
        """shadow_pairs rows (PAIR_COLUMNS); one already stored (a replay) is ignored."""
        self._insert(f"INSERT OR IGNORE INTO shadow_pairs ({', '.join(PAIR_COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(PAIR_COLUMNS))})", rows)

    def _insert(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def prune(self, retention_days: float | None) -> int:
        if retention_days is None:
            return 0
        cutoff = time.time() - retention_days * 86400
        cur = self.conn().execute("DELETE FROM requests WHERE ts < ?", (cutoff,))
        self.conn().execute("DELETE FROM shadow_pairs WHERE ts < ?", (cutoff,))
        return int(cur.rowcount or 0)

    def latest_request(self, request_id: str) -> tuple[str | None, str | None] | None:
        row = self.conn().execute("SELECT policy, tier FROM requests WHERE request_id = ? ORDER BY ts DESC LIMIT 1",
                                  (request_id,)).fetchone()
        return (row[0], row[1]) if row is not None else None

    def add_feedback(self, ts: float, request_id: str, score: float, correct: int | None, source: str) -> int:
        cur = self.conn().execute("INSERT INTO feedback (ts, request_id, score, correct, source) VALUES (?, ?, ?, ?, ?)",
                                  (ts, request_id, score, correct, source))
        return int(cur.lastrowid or 0)

    def mark_review(self, request_id: str, ts: float, policy: str, tier: str | None) -> None:
        self.conn().execute("INSERT OR IGNORE INTO review_sample (request_id, ts, policy, tier) VALUES (?, ?, ?, ?)",
                            (request_id, ts, policy, tier))

    def read_requests(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        where, args = _window("ts", since, until)
        try:
            cur = self.conn().execute(f"SELECT * FROM requests{where} ORDER BY ts", args)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def count_requests(self) -> int:
        return int(self.conn().execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def review_queue(self, pending_only: bool = True, limit: int = 100) -> list[tuple[Any, ...]]:
        sql = ("SELECT s.request_id, s.ts, s.policy, s.tier, COUNT(f.id), AVG(f.score) FROM review_sample s "
               "LEFT JOIN feedback f ON f.request_id = s.request_id GROUP BY s.request_id "
               + ("HAVING COUNT(f.id) = 0 " if pending_only else "") + "ORDER BY s.ts DESC LIMIT ?")
        return [tuple(r) for r in self.conn().execute(sql, (limit,))]

    def labelled(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn().execute(
            "SELECT r.request_id, r.prompt_text, r.tier, AVG(f.score) FROM requests r "
            "JOIN feedback f ON f.request_id = r.request_id "
            "WHERE r.prompt_text IS NOT NULL AND r.tier IS NOT NULL AND f.score IS NOT NULL "
            "GROUP BY r.request_id, r.prompt_text, r.tier").fetchall()]

    def read_shadow_pairs(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """shadow_pairs rows in [since, until), oldest first, each with `feedback_correct` (the latest
        feedback's `correct` on its request, or None). A log older than the table reads as none."""
        if not self.path.is_file():
            return []
        where, args = _window("p.ts", since, until)
        try:
            cur = self.conn().execute(SHADOW_PAIRS_SQL.format(where=where), args)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def open_store(target: str | Path, read_only: bool = False) -> LogStore:
    """The store for a postgresql:// URL or a SQLite path (not yet connected)."""
    from localroute.monitoring.postgres_log import PostgresLogStore, is_postgres_url

    if is_postgres_url(target):
        return PostgresLogStore(str(target), COLUMNS, [name for name, _ in MIGRATIONS], PAIR_COLUMNS)
    return SQLiteLogStore(Path(target), read_only=read_only)


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


def _window(column: str, since: float | None, until: float | None) -> tuple[str, list[float]]:
    """A `WHERE` clause (or "") and its arguments for `column` in [since, until)."""
    clauses, args = [], []
    if since is not None:
        clauses.append(f"{column} >= ?")
        args.append(since)
    if until is not None:
        clauses.append(f"{column} < ?")
        args.append(until)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), args


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


# ---------- reading and summarising ----------


