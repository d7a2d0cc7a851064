"""The routing log in PostgreSQL (`routing_log_url = "postgresql://..."`, localroute[shared]).

The same store interface as the SQLite log (sqlite_store.py `SQLiteLogStore`) and the same named
migrations: `POSTGRES_MIGRATIONS` has one entry per name in sqlite_store's `MIGRATIONS`, and the
store refuses to open while one is missing (a new SQLite migration, e.g. a new table, needs its
PostgreSQL twin here). Both record what they applied in `_migrations`.

- `requests`, `feedback`, `shadow_pairs` and the stored Responses (`responses`) are
  range-partitioned by day on `ts` (epoch seconds, as in SQLite).
  Retention drops whole day partitions older than `routing_log_retention_days`: the disk comes
  back at once, with no DELETE and no VACUUM. Partitions for today and the next two days are made
  at start-up and hourly, and for any other day a batch holds before it is written.
- `(request_id, ts)` is unique (requests, shadow_pairs), and rows are inserted `ON CONFLICT DO NOTHING`, so a spilled batch
  replayed twice (routing_log.py) is stored once.
- Replicas starting together serialise migrations and partition creation on an advisory lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from localroute.errors import ConfigError, MissingExtraError
from localroute.redaction import mask_url

__all__ = ["POSTGRES_MIGRATIONS", "PostgresLogStore", "clean_row", "is_postgres_url"]

LOCK_ID = 7_262_020  # pg_advisory_xact_lock key for migrations and partition DDL
PARTITIONED = ("requests", "feedback", "shadow_pairs", "responses")

# both engines' read of the shadow pairs, with the latest feedback's `correct` on each pair's request
SHADOW_PAIRS_SQL = (
    "SELECT p.*, (SELECT f.correct FROM feedback f WHERE f.request_id = p.request_id AND "
    "f.correct IS NOT NULL ORDER BY f.ts DESC LIMIT 1) AS feedback_correct FROM shadow_pairs p"
    "{where} ORDER BY p.ts"
)

# both engines' read for `train --from-log`: (request_id, prompt_text, tier, mean feedback score,
# evidence: its category); `{evidence}` is NULL for a SQLite log older than the evidence column
LABELLED_SQL = (
    "SELECT r.request_id, r.prompt_text, r.tier, AVG(f.score), {evidence} FROM requests r "
    "JOIN feedback f ON f.request_id = r.request_id "
    "WHERE r.prompt_text IS NOT NULL AND r.tier IS NOT NULL AND f.score IS NOT NULL "
    "GROUP BY r.request_id, r.prompt_text, r.tier{group}"
)

# name -> SQL, one per sqlite_store.MIGRATIONS name. Append only, as there.
POSTGRES_MIGRATIONS: dict[str, str] = {
    "001_create_requests": """
        CREATE TABLE requests (
            id BIGINT GENERATED ALWAYS AS IDENTITY,
            ts DOUBLE PRECISION NOT NULL,
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
            confidence DOUBLE PRECISION,
            attempts TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_s DOUBLE PRECISION,
            latency_s DOUBLE PRECISION,
            cost_usd DOUBLE PRECISION,
            counterfactual_cost_usd DOUBLE PRECISION,
            PRIMARY KEY (id, ts)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX requests_ts ON requests(ts);
    """,
    "002_energy_and_gpu": """
        ALTER TABLE requests ADD COLUMN energy_j DOUBLE PRECISION;
        ALTER TABLE requests ADD COLUMN gpu_utilization_ratio DOUBLE PRECISION;
        ALTER TABLE requests ADD COLUMN gpu_power_w DOUBLE PRECISION;
    """,
    "003_text_and_disconnects": """
        ALTER TABLE requests ADD COLUMN disconnected INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE requests ADD COLUMN prompt_text TEXT;
        ALTER TABLE requests ADD COLUMN answer_text TEXT;
    """,
    "004_feedback_and_review": """
        CREATE TABLE feedback (
            id BIGINT GENERATED ALWAYS AS IDENTITY,
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            score DOUBLE PRECISION,
            correct INTEGER,
            source TEXT,
            PRIMARY KEY (id, ts)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX feedback_request_id ON feedback(request_id);
        CREATE TABLE review_sample (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            policy TEXT,
            tier TEXT
        );
        CREATE UNIQUE INDEX requests_request_id ON requests(request_id, ts)
    """,
    "005_decision_evidence": """
        ALTER TABLE requests ADD COLUMN evidence TEXT;
    """,
    "006_stored_responses": """
        CREATE TABLE responses (
            response_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            response TEXT NOT NULL,
            messages TEXT NOT NULL
        );
        CREATE INDEX responses_ts ON responses(ts)
    """,
    # issue 19's shadow evaluation (made day-partitioned by 008)
    "007_shadow_pairs": """
        CREATE TABLE shadow_pairs (
            id BIGSERIAL PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            category TEXT NOT NULL,
            tier TEXT NOT NULL,
            confidence DOUBLE PRECISION,
            threshold DOUBLE PRECISION,
            sample_rate DOUBLE PRECISION NOT NULL,
            stratum TEXT,
            status TEXT NOT NULL,
            scorer TEXT,
            score DOUBLE PRECISION,
            agrees INTEGER,
            error TEXT,
            cost_usd DOUBLE PRECISION,
            frontier_latency_s DOUBLE PRECISION
        );
        CREATE INDEX shadow_pairs_ts ON shadow_pairs(ts);
        CREATE INDEX shadow_pairs_category ON shadow_pairs(category, tier)
    """,
    # shadow pairs written through the store (routing_log.py RoutingLog.add_pairs): day-partitioned
    # like requests, for retention by dropping partitions, and unique on (request_id, ts) for
    # ON CONFLICT DO NOTHING replays. 007's table is dropped, not copied: before this migration no
    # writer stored pairs in PostgreSQL (they were only counted in /metrics), so it is empty.
    "008_shadow_pairs_through_store": """
        DROP TABLE shadow_pairs;
        CREATE TABLE shadow_pairs (
            id BIGINT GENERATED ALWAYS AS IDENTITY,
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            category TEXT NOT NULL,
            tier TEXT NOT NULL,
            confidence DOUBLE PRECISION,
            threshold DOUBLE PRECISION,
            sample_rate DOUBLE PRECISION NOT NULL,
            stratum TEXT,
            status TEXT NOT NULL,
            scorer TEXT,
            score DOUBLE PRECISION,
            agrees INTEGER,
            error TEXT,
            cost_usd DOUBLE PRECISION,
            frontier_latency_s DOUBLE PRECISION,
            PRIMARY KEY (id, ts)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX shadow_pairs_ts ON shadow_pairs(ts);
        CREATE INDEX shadow_pairs_category ON shadow_pairs(category, tier);
        CREATE UNIQUE INDEX shadow_pairs_request_ts ON shadow_pairs(request_id, ts)
    """,
    # stored Responses (response_store.py) in the log's database, so that any replica continues a
    # response another stored: day-partitioned like the rest of the log, retention dropping
    # partitions. 006's table is dropped, not copied: before this migration responses were stored
    # only in SQLite, so it is empty. A partitioned table's key holds the partition column: a
    # response id is unique by itself (it is the chat completion's id), and a get reads the newest.
    "009_responses_by_day": """
        DROP TABLE responses;
        CREATE TABLE responses (
            response_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            response TEXT NOT NULL,
            messages TEXT NOT NULL,
            PRIMARY KEY (response_id, ts)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX responses_ts ON responses(ts)
    """,
}


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def _day(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise MissingExtraError("psycopg (for a postgresql:// routing_log_url)", "shared") from exc
    return psycopg


LOCK_TIMEOUT_MS = 5_000
STATEMENT_TIMEOUT_MS = 60_000


def clean_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """PostgreSQL text holds no NUL character (a prompt logged with log_prompts may): U+FFFD instead."""
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v for v in row)


class PostgresLogStore:
    """The routing log's tables in PostgreSQL. Not thread-safe: one per thread (the writer keeps
    one; feedback and reports open their own, briefly)."""

    engine = "postgresql"

    def __init__(
        self,
        url: str,
        columns: Sequence[str],
        migration_names: Sequence[str],
        pair_columns: Sequence[str] = (),
        connect_timeout_s: float = 5.0,
    ) -> None:
        missing = [n for n in migration_names if n not in POSTGRES_MIGRATIONS]
        if missing:
            raise ConfigError(
                f"routing_log_url: no PostgreSQL version of migration(s) {', '.join(missing)} "
                f"(localroute/monitoring/postgres_log.py)",
                param="routing_log_url",
            )
        self.url = url
        self.columns = tuple(columns)
        self.pair_columns = tuple(pair_columns)
        self.migration_names = list(migration_names)
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._days: set[tuple[str, str]] = set()

    @property
    def target(self) -> str:
        """The URL without its passwords, in the user part or the query string (messages, reports)."""
        return mask_url(self.url)

    def conn(self) -> Any:
        if self._conn is None or self._conn.closed:
            psycopg = _psycopg()
            # bounded waits: a partition DROP queued behind a long reader, or a dead link, fails
            # (and the rows spill) instead of stalling the writer thread
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)),
                options=f"-c lock_timeout={LOCK_TIMEOUT_MS} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def reset(self) -> None:
        """Drop the connection after an error; the next call reconnects."""
        try:
            self.close()
        except Exception:
            self._conn = None

    # ---- schema ----

    def migrate(self) -> list[str]:
        conn = self.conn()
        with conn.transaction():  # under the lock: replicas starting together create it once
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION "
                "NOT NULL)"
            )
        applied = []
        for name in self.migration_names:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
                if conn.execute("SELECT 1 FROM _migrations WHERE name = %s", (name,)).fetchone():
                    continue
                for statement in (s.strip() for s in POSTGRES_MIGRATIONS[name].split(";")):
                    if statement:
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (%s, %s)", (name, time.time())
                )
            applied.append(name)
        self.ensure_partitions([time.time() + d * 86400 for d in range(3)])
        return applied

    def ensure_partitions(self, timestamps: Iterable[float]) -> None:
        """Day partitions of every partitioned table for every day in `timestamps`."""
        wanted = []
        for ts in timestamps:
            day = _day(ts)
            for table in PARTITIONED:
                if (table, day.strftime("%Y%m%d")) not in self._days:
                    wanted.append((table, day))
        if not wanted:
            return
        conn = self.conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
            for table, day in wanted:
                name = f"{table}_d{day.strftime('%Y%m%d')}"
                lo, hi = day.timestamp(), (day + timedelta(days=1)).timestamp()
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({lo!r}) "
                    f"TO ({hi!r})"
                )
        self._days.update((table, day.strftime("%Y%m%d")) for table, day in wanted)

    def partitions(self, table: str = "requests") -> list[str]:
        rows = (
            self.conn()
            .execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s ORDER BY c.relname",
                (table,),
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    def prune(self, retention_days: float | None) -> int:
        """Drop day partitions wholly older than the retention; returns how many were dropped."""
        if retention_days is None:
            return 0
        cutoff = time.time() - retention_days * 86400
        dropped = 0
        conn = self.conn()
        for table in PARTITIONED:
            for name in self.partitions(table):
                try:
                    day = datetime.strptime(name.rsplit("_d", 1)[1], "%Y%m%d").replace(tzinfo=UTC)
                except (IndexError, ValueError):
                    continue
                if (day + timedelta(days=1)).timestamp() <= cutoff:
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
                        conn.execute(f"DROP TABLE IF EXISTS {name}")
                    self._days.discard((table, day.strftime("%Y%m%d")))
                    dropped += 1
        conn.execute("DELETE FROM review_sample WHERE ts < %s", (cutoff,))
        return dropped

    # ---- writes ----

    def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        ts_index = self.columns.index("ts")
        self.ensure_partitions(r[ts_index] for r in rows)
        sql = (
            f"INSERT INTO requests ({', '.join(self.columns)}) VALUES ({', '.join(['%s'] * len(self.columns))}) "
            "ON CONFLICT DO NOTHING"
        )
        conn = self.conn()
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql, [clean_row(r) for r in rows])

    def permanent(self, exc: BaseException) -> bool:
        """Whether `exc` is about the rows (a value PostgreSQL refuses), not the server: those rows
        would fail the same way on every replay."""
        errors = _psycopg()
        return isinstance(exc, errors.DataError | errors.IntegrityError)

    def insert_pairs(self, rows: Sequence[Sequence[Any]]) -> None:
        """shadow_pairs rows (`pair_columns`); one already stored (a replay) is ignored."""
        ts_index = self.pair_columns.index("ts")
        self.ensure_partitions(r[ts_index] for r in rows)
        sql = (
            f"INSERT INTO shadow_pairs ({', '.join(self.pair_columns)}) "
            f"VALUES ({', '.join(['%s'] * len(self.pair_columns))}) ON CONFLICT DO NOTHING"
        )
        conn = self.conn()
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql, [clean_row(r) for r in rows])

    def latest_request(self, request_id: str) -> tuple[str | None, str | None] | None:
        row = (
            self.conn()
            .execute(
                "SELECT policy, tier FROM requests WHERE request_id = %s ORDER BY ts DESC LIMIT 1",
                (request_id,),
            )
            .fetchone()
        )
        return (row[0], row[1]) if row is not None else None

    def add_feedback(self, ts: float, request_id: str, score: float, correct: int | None, source: str) -> int:
        self.ensure_partitions([ts])
        row = (
            self.conn()
            .execute(
                "INSERT INTO feedback (ts, request_id, score, correct, source) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (ts, request_id, score, correct, source),
            )
            .fetchone()
        )
        return int(row[0])

    def mark_review(self, request_id: str, ts: float, policy: str, tier: str | None) -> None:
        self.conn().execute(
            "INSERT INTO review_sample (request_id, ts, policy, tier) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (request_id, ts, policy, tier),
        )

    def put_response(self, response_id: str, ts: float, response: str, messages: str,
                     retention_days: float | None = None) -> None:
        """Store a Responses object; `retention_days` is `prune`'s to apply (dropping day partitions)."""
        self.ensure_partitions([ts])
        self.conn().execute(
            "INSERT INTO responses (response_id, ts, response, messages) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            clean_row((response_id, ts, response, messages)),
        )

    # ---- reads ----

    def get_response(self, response_id: str) -> tuple[str, str] | None:
        row = (
            self.conn()
            .execute(
                "SELECT response, messages FROM responses WHERE response_id = %s ORDER BY ts DESC LIMIT 1",
                (response_id,),
            )
            .fetchone()
        )
        return None if row is None else (row[0], row[1])

    def read_requests(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        clauses, args = [], []
        if since is not None:
            clauses.append("ts >= %s")
            args.append(since)
        if until is not None:
            clauses.append("ts < %s")
            args.append(until)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        cur = self.conn().execute(f"SELECT * FROM requests{where} ORDER BY ts", args)
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def count_requests(self) -> int:
        return int(self.conn().execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def review_queue(self, pending_only: bool = True, limit: int = 100) -> list[tuple[Any, ...]]:
        sql = (
            "SELECT s.request_id, s.ts, s.policy, s.tier, COUNT(f.id), AVG(f.score) FROM review_sample s "
            "LEFT JOIN feedback f ON f.request_id = s.request_id GROUP BY s.request_id, s.ts, s.policy, s.tier "
            + ("HAVING COUNT(f.id) = 0 " if pending_only else "")
            + "ORDER BY s.ts DESC LIMIT %s"
        )
        return [tuple(r) for r in self.conn().execute(sql, (limit,)).fetchall()]

    def labelled(self) -> list[tuple[Any, ...]]:
        """(request_id, prompt_text, tier, mean score, evidence) of requests with feedback, for `train --from-log`."""
        sql = LABELLED_SQL.format(evidence="r.evidence", group=", r.evidence")
        return [tuple(r) for r in self.conn().execute(sql).fetchall()]

    def read_shadow_pairs(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """shadow_pairs rows in [since, until), oldest first, each with `feedback_correct`."""
        clauses, args = [], []
        if since is not None:
            clauses.append("p.ts >= %s")
            args.append(since)
        if until is not None:
            clauses.append("p.ts < %s")
            args.append(until)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        cur = self.conn().execute(SHADOW_PAIRS_SQL.format(where=where), args)
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
