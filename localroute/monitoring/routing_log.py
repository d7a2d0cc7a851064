"""The routing log's writer: one SQLite row per request (successes, 4xx/5xx errors, streams,
disconnects). Its reader and the summaries `localroute report` prints are log_report.py's.

- WAL mode, so `localroute report` can read while the server writes.
- Named, ordered migrations recorded in `_migrations`; an old log is upgraded in place on open.
- Rows are built on the response path (cheap: numbers and a little JSON) and written by one writer
  thread; `close()` drains the queue, so a completed response's row is not lost on shutdown.
- Prompt and answer text are not stored unless `log_prompts` is on, and then with obvious secrets
  (API keys, bearer tokens, private keys, passwords) redacted.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localroute.redaction import redact
from localroute.routing.base import finite

if TYPE_CHECKING:
    from localroute.monitoring.cost import RequestCost
    from localroute.monitoring.record import RequestRecord
    from localroute.monitoring.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "RoutingLog", "migrate", "redact"]

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
]

COLUMNS = (
    "ts", "request_id", "endpoint", "policy", "stream", "status", "error", "tier", "escalated", "degraded",
    "signal", "confidence", "attempts", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s", "cost_usd",
    "counterfactual_cost_usd", "energy_j", "gpu_utilization_ratio", "gpu_power_w", "disconnected",
    "prompt_text", "answer_text", "evidence",
)


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


# ---------- the writer ----------


class RoutingLog:
    """Observer of finished requests (`observe`) that appends rows through a writer thread."""

    def __init__(self, path: Path, retention_days: float | None = None, log_prompts: bool = False,
                 telemetry: Telemetry | None = None) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.log_prompts = log_prompts
        self.telemetry = telemetry
        conn = connect(self.path)  # migrate now, so a bad path fails at start-up, not on a request
        try:
            self.applied = migrate(conn)
            self._prune(conn)
        finally:
            conn.close()
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="localroute-routing-log", daemon=True)
        self._thread.start()

    def __call__(self, rec: RequestRecord) -> None:
        self.observe(rec)

    def observe(self, rec: RequestRecord) -> None:
        """Build the row now (cheap) and queue it; never raises into the request."""
        if self._closed:
            log.warning("routing log closed; row for %s written synchronously", rec.request_id)
            self._write_now([self.row(rec)])
            return
        self._queue.put(self.row(rec))

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
        conn = connect(self.path)
        last_prune = time.monotonic()
        try:
            while True:
                item = self._queue.get()
                batch = [item]
                while len(batch) < 512:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                rows = [r for r in batch if r is not None]
                try:
                    if rows:
                        self._insert(conn, rows)
                    if time.monotonic() - last_prune > 3600:
                        self._prune(conn)
                        last_prune = time.monotonic()
                except sqlite3.Error:
                    log.exception("routing log write failed (%d rows)", len(rows))
                finally:
                    for _ in batch:
                        self._queue.task_done()
                if any(r is None for r in batch):
                    return
        finally:
            conn.close()

    def _insert(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        sql = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _write_now(self, rows: Sequence[tuple[Any, ...]]) -> None:
        conn = connect(self.path)
        try:
            self._insert(conn, rows)
        finally:
            conn.close()

    def _prune(self, conn: sqlite3.Connection) -> int:
        if self.retention_days is None:
            return 0
        cur = conn.execute("DELETE FROM requests WHERE ts < ?", (time.time() - self.retention_days * 86400,))
        return int(cur.rowcount or 0)

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
        if leftover:
            self._write_now(leftover)


def _request_text(request: Any) -> str:
    messages = getattr(request, "messages", None)
    if messages:
        return "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in messages)
    return str(getattr(request, "prompt", "") or "")


# ---------- reading and summarising ----------


