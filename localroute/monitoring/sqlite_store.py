"""The routing log in one SQLite file (a path; the default): the store `routing_log.open_store`
returns for anything but a postgresql:// URL (that one is postgres_log.py's).

- WAL mode, so `localroute report` can read while the server writes.
- `MIGRATIONS`: the named, ordered migrations, recorded in `_migrations`; an old log is upgraded in
  place on open. Their names are the routing log's, shared with PostgreSQL
  (postgres_log.POSTGRES_MIGRATIONS has one entry per name, each in its own dialect).
- A new table needs its entry in log_migrate.TABLES too (with the key that makes a row the same
  row in both engines), or `localroute log migrate` leaves its rows behind (a test checks it).
- The row shapes it stores (the request and shadow pair columns) are the writer's
  (routing_log.COLUMNS, PAIR_COLUMNS), given to the store when it is opened.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localroute.monitoring.postgres_log import LABELLED_SQL, SHADOW_PAIRS_SQL

__all__ = ["MIGRATIONS", "SQLiteLogStore", "connect", "migrate"]

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
    # stored Responses follow the log's engine (PostgreSQL: shared by replicas, the table becomes
    # day-partitioned for retention by dropping partitions); SQLite's table stays as 006 made it
    ("009_responses_by_day", ""),
]


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



class SQLiteLogStore:
    """The log in one SQLite file. `columns`, `pair_columns`: the requests and shadow_pairs
    columns a row given to `insert` / `insert_pairs` fills, in order. `read_only` opens without
    creating or migrating (reports)."""

    engine = "sqlite"

    def __init__(self, path: Path, columns: Sequence[str], pair_columns: Sequence[str],
                 read_only: bool = False) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.pair_columns = tuple(pair_columns)
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
        self._insert(f"INSERT INTO requests ({', '.join(self.columns)}) "
                     f"VALUES ({', '.join('?' * len(self.columns))})", rows)

    def insert_pairs(self, rows: Sequence[Sequence[Any]]) -> None:
        """shadow_pairs rows (`pair_columns`); one already stored (a replay) is ignored."""
        self._insert(f"INSERT OR IGNORE INTO shadow_pairs ({', '.join(self.pair_columns)}) "
                     f"VALUES ({', '.join('?' * len(self.pair_columns))})", rows)

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
        self.conn().execute("DELETE FROM responses WHERE ts < ?", (cutoff,))
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

    def put_response(self, response_id: str, ts: float, response: str, messages: str,
                     retention_days: float | None = None) -> None:
        """Store (or replace) a Responses object and its conversation; those past `retention_days`
        are deleted in the same transaction."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR REPLACE INTO responses (response_id, ts, response, messages) VALUES (?, ?, ?, ?)",
                         (response_id, ts, response, messages))
            if retention_days is not None:
                conn.execute("DELETE FROM responses WHERE ts < ?", (ts - retention_days * 86400,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def get_response(self, response_id: str) -> tuple[str, str] | None:
        row = self.conn().execute("SELECT response, messages FROM responses WHERE response_id = ?",
                                  (response_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def read_requests(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        where, args = _window("ts", since, until)
        return self._dicts(f"SELECT * FROM requests{where} ORDER BY ts", args)

    def count_requests(self) -> int:
        return int(self.conn().execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def review_queue(self, pending_only: bool = True, limit: int = 100) -> list[tuple[Any, ...]]:
        sql = ("SELECT s.request_id, s.ts, s.policy, s.tier, COUNT(f.id), AVG(f.score) FROM review_sample s "
               "LEFT JOIN feedback f ON f.request_id = s.request_id GROUP BY s.request_id "
               + ("HAVING COUNT(f.id) = 0 " if pending_only else "") + "ORDER BY s.ts DESC LIMIT ?")
        return [tuple(r) for r in self.conn().execute(sql, (limit,))]

    def labelled(self) -> list[tuple[Any, ...]]:
        conn = self.conn()
        has_evidence = any(r[1] == "evidence" for r in conn.execute("PRAGMA table_info(requests)"))
        sql = LABELLED_SQL.format(evidence="r.evidence", group=", r.evidence") if has_evidence else \
            LABELLED_SQL.format(evidence="NULL", group="")
        return [tuple(r) for r in conn.execute(sql).fetchall()]

    def read_shadow_pairs(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """shadow_pairs rows in [since, until), oldest first, each with `feedback_correct` (the latest
        feedback's `correct` on its request, or None). A log older than the table reads as none."""
        where, args = _window("p.ts", since, until)
        return self._dicts(SHADOW_PAIRS_SQL.format(where=where), args)

    def _dicts(self, sql: str, args: list[float]) -> list[dict[str, Any]]:
        """A read's rows as dicts; no file, or a log older than the table read, reads as none."""
        if not self.path.is_file():
            return []
        try:
            cur = self.conn().execute(sql, args)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]



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
