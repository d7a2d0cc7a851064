"""The routing log: one SQLite row per request (successes, 4xx/5xx errors, streams, disconnects),
and the summaries `localroute report` prints from it.

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
import math
import queue
import re
import sqlite3
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from localroute.cost import RequestCost
    from localroute.server.app import RequestRecord
    from localroute.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "RoutingLog", "load_calibration", "migrate", "read_rows", "redact", "summarize"]

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
    # (review_sample_rate); both keyed by the requests row's request_id (localroute.feedback).
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
]

COLUMNS = (
    "ts", "request_id", "endpoint", "policy", "stream", "status", "error", "tier", "escalated", "degraded",
    "signal", "confidence", "attempts", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s", "cost_usd",
    "counterfactual_cost_usd", "energy_j", "gpu_utilization_ratio", "gpu_power_w", "disconnected",
    "prompt_text", "answer_text", "evidence",
)


def _connect(path: Path) -> sqlite3.Connection:
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


# ---------- redaction ----------

_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL), "[redacted:private_key]"),
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}"), "[redacted:api_key]"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "[redacted:aws_key]"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "[redacted:github_token]"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "[redacted:slack_token]"),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"), "[redacted:google_key]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "[redacted:jwt]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/\-]{12,}=*"), r"\1 [redacted]"),
    (re.compile(r"(?i)\b(password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)(\s*[:=]\s*)"
                r"(\"[^\"]*\"|'[^']*'|\S+)"), r"\1\2[redacted]"),
]


def redact(text: str) -> str:
    """Mask obvious secrets. Heuristic: it catches well-known key shapes, not every secret."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


# ---------- the writer ----------


class RoutingLog:
    """Observer of finished requests (`observe`) that appends rows through a writer thread."""

    def __init__(self, path: Path, retention_days: float | None = None, log_prompts: bool = False,
                 telemetry: Telemetry | None = None) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.log_prompts = log_prompts
        self.telemetry = telemetry
        conn = _connect(self.path)  # migrate now, so a bad path fails at start-up, not on a request
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
                    "tier": a.tier,
                    "confidence": _finite(a.confidence),
                    "threshold": a.threshold,
                    "accepted": a.accepted,
                    "prompt_tokens": a.prompt_tokens,
                    "completion_tokens": a.completion_tokens,
                    "latency_s": a.latency_s,
                    "ttft_s": a.ttft_s,
                    "error": a.error,
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
            _finite(decision.confidence) if decision is not None else None,
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
        conn = _connect(self.path)
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
        conn = _connect(self.path)
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


def _finite(x: float | None) -> float | None:
    """NaN -> None; +-inf clamped (JSON and SQLite aggregates cannot hold them)."""
    if x is None or math.isnan(x):
        return None
    return max(min(x, 1e9), -1e9)


def _request_text(request: Any) -> str:
    messages = getattr(request, "messages", None)
    if messages:
        return "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in messages)
    return str(getattr(request, "prompt", "") or "")


# ---------- reading and summarising ----------


def read_rows(path: Path, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """Rows in [since, until) (unix seconds) as dicts, oldest first; missing columns of an older
    schema read as None. Opening does not migrate: reporting never writes to the log."""
    path = Path(path)
    if not path.is_file():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        clauses, args = [], []
        if since is not None:
            clauses.append("ts >= ?")
            args.append(since)
        if until is not None:
            clauses.append("ts < ?")
            args.append(until)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = [dict(r) for r in conn.execute(f"SELECT * FROM requests{where} ORDER BY ts", args)]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()
    for r in rows:
        for c in COLUMNS:
            r.setdefault(c, None)
        try:
            r["attempts"] = json.loads(r["attempts"] or "[]")
        except ValueError:
            r["attempts"] = []
        try:
            r["evidence"] = json.loads(r["evidence"]) if r["evidence"] else None
        except ValueError:
            r["evidence"] = None
    return rows


HEALTH_BAND = (0.15, 0.35)


def escalation_health(rate: float | None) -> str:
    """The usual band of a calibrated cascade is 15-35% escalations."""
    if rate is None:
        return "no_data"
    if rate > 0.50:
        return "too_conservative"
    if rate < 0.05:
        return "too_permissive"
    if HEALTH_BAND[0] <= rate <= HEALTH_BAND[1]:
        return "healthy"
    return "outside_band"


HEALTH_NOTES = {
    "too_conservative": "over 50% of answered queries escalate: the threshold is probably too strict",
    "too_permissive": "under 5% escalate: the threshold is probably too lenient (quality risk)",
    "outside_band": "outside the usual 15-35% band of a calibrated cascade",
    "healthy": "within the usual 15-35% band of a calibrated cascade",
    "no_data": "no answered requests in the window",
}

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _pct(values: Sequence[float], qs: Iterable[float]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return {f"p{round(q * 100)}": (float(np.quantile(arr, q)) if arr.size else None) for q in qs}


def load_calibration(path: Path | None) -> dict[str, dict[str, Any]]:
    """Per-tier confidence quantiles/histogram from a calibration file, read defensively: JSON or
    TOML; per-tier sections under `tiers` (dict or list with `name`/`tier`) or one top-level
    section for the first tier (key `_default`). Anything unreadable gives {}."""
    if path is None or not Path(path).is_file():
        return {}
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    data: Any
    try:
        data = json.loads(raw)
    except ValueError:
        try:
            data = tomllib.loads(raw)
        except tomllib.TOMLDecodeError:
            return {}
    if not isinstance(data, dict):
        return {}
    sections: dict[str, Any] = {}
    tiers = data.get("tiers")
    if isinstance(tiers, dict):
        sections.update({str(k): v for k, v in tiers.items() if isinstance(v, dict)})
    elif isinstance(tiers, list):
        for t in tiers:
            if isinstance(t, dict) and (t.get("name") or t.get("tier")):
                sections[str(t.get("name") or t.get("tier"))] = t
    if not sections:
        name = data.get("tier") or data.get("tier_name") or "_default"
        sections[str(name)] = data
    out = {}
    for name, sec in sections.items():
        found = _calibration_distribution(sec)
        if found:
            out[name] = found
    return out


def _calibration_distribution(sec: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in sec.items():
        k = str(key).lower()
        if "quantile" in k and "quantiles" not in found:
            q = _as_quantiles(value)
            if q:
                found["quantiles"] = q
        elif "hist" in k and isinstance(value, dict) and "histogram" not in found:
            edges = value.get("edges") or value.get("bins") or value.get("bin_edges")
            counts = value.get("counts") or value.get("density") or value.get("hist")
            if isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1:
                try:
                    found["histogram"] = {"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]}
                except (TypeError, ValueError):
                    pass
        elif k == "threshold" and isinstance(value, int | float):
            found["threshold"] = float(value)
        elif isinstance(value, dict) and depth < 2:
            for k2, v2 in _calibration_distribution(value, depth + 1).items():
                found.setdefault(k2, v2)
    if "quantiles" not in found and "histogram" in found:
        found["quantiles"] = _hist_quantiles(found["histogram"])
    return found


def _as_quantiles(value: Any) -> dict[float, float]:
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [tuple(p) for p in value if isinstance(p, list | tuple) and len(p) == 2]
    out = {}
    for q, v in pairs:
        text = str(q).strip().lower()
        try:
            if text.startswith("p"):  # p01, p50, p99: percentiles
                qf = float(text[1:]) / 100
            else:  # 0.5 or 50
                qf = float(text.lstrip("q"))
                qf = qf / 100 if qf > 1 else qf
            out[qf] = float(v)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


def _hist_quantiles(hist: dict[str, list[float]]) -> dict[float, float]:
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    if counts.sum() <= 0:
        return {}
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    return {q: float(np.interp(q, cdf, edges)) for q in QUANTILES}


def _nearest(quantiles: dict[float, float], q: float) -> float | None:
    if not quantiles:
        return None
    return quantiles[min(quantiles, key=lambda k: abs(k - q))]


def _bucket_start(ts: float, bucket: str) -> float:
    size = 3600 if bucket == "hour" else 86400
    return math.floor(ts / size) * size


def summarize(rows: Sequence[dict[str, Any]], bucket: str = "day",
              calibration: dict[str, dict[str, Any]] | None = None,
              first_tier: str | None = None) -> dict[str, Any]:
    """Everything `localroute report` shows, as JSON-able data."""
    answered = [r for r in rows if r["status"] == 200 and r["tier"]]
    n_ans = len(answered)
    escalated = sum(1 for r in answered if r["escalated"])
    rate = escalated / n_ans if n_ans else None
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    total_cost = float(sum(costs))
    with_cf = [r for r in rows if r["counterfactual_cost_usd"] is not None and r["cost_usd"] is not None]
    cf_total = float(sum(r["counterfactual_cost_usd"] for r in with_cf))
    cost_with_cf = float(sum(r["cost_usd"] for r in with_cf))
    savings = 100.0 * (cf_total - cost_with_cf) / cf_total if cf_total > 0 else None

    by_tier: dict[str, int] = {}
    for r in answered:
        by_tier[r["tier"]] = by_tier.get(r["tier"], 0) + 1
    conf: dict[str, list[float]] = {}
    tokens: dict[str, dict[str, int]] = {}
    for r in rows:
        for a in r["attempts"]:
            tier = a.get("tier")
            if not tier:
                continue
            t = tokens.setdefault(tier, {"prompt": 0, "completion": 0})
            t["prompt"] += int(a.get("prompt_tokens") or 0)
            t["completion"] += int(a.get("completion_tokens") or 0)
            if a.get("confidence") is not None:
                conf.setdefault(tier, []).append(float(a["confidence"]))
    calibration = calibration or {}
    confidence = {}
    for tier, values in conf.items():
        cal = calibration.get(tier) or (calibration.get("_default") if tier == first_tier else None)
        entry: dict[str, Any] = {"n": len(values), "mean": float(np.mean(values)), **_pct(values, QUANTILES)}
        if cal and cal.get("quantiles"):
            cq = cal["quantiles"]
            median, p10 = _nearest(cq, 0.5), _nearest(cq, 0.1)
            entry["calibration"] = {f"p{round(q * 100)}": v for q, v in cq.items()}
            entry["median_shift"] = entry["p50"] - median if median is not None else None
            if p10 is not None:
                # a calibrated tier puts ~10% of its confidences below its own p10; far off means drift
                entry["share_below_calibration_p10"] = float(np.mean(np.asarray(values) < p10))
        confidence[tier] = entry

    buckets: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        buckets.setdefault(_bucket_start(r["ts"], bucket), []).append(r)
    series = []
    for start in sorted(buckets):
        b = buckets[start]
        b_ans = [r for r in b if r["status"] == 200 and r["tier"]]
        b_cost = [r["cost_usd"] for r in b if r["cost_usd"] is not None]
        b_cf = [r["counterfactual_cost_usd"] for r in b if r["counterfactual_cost_usd"] is not None]
        series.append({
            "start": start,
            "requests": len(b),
            "escalation_rate": (sum(1 for r in b_ans if r["escalated"]) / len(b_ans)) if b_ans else None,
            "cost_per_query_usd": (sum(b_cost) / len(b_cost)) if b_cost else None,
            "counterfactual_per_query_usd": (sum(b_cf) / len(b_cf)) if b_cf else None,
        })

    latency = [r["latency_s"] for r in rows if r["status"] == 200 and r["latency_s"] is not None]
    ttft = [r["ttft_s"] for r in rows if r["status"] == 200 and r["ttft_s"] is not None]
    utils = [r["gpu_utilization_ratio"] for r in rows if r["gpu_utilization_ratio"] is not None]
    energy = [r["energy_j"] for r in rows if r["energy_j"] is not None]
    health = escalation_health(rate)
    return {
        "since": rows[0]["ts"] if rows else None,
        "until": rows[-1]["ts"] if rows else None,
        "requests": len(rows),
        "answered": n_ans,
        "errors": sum(1 for r in rows if r["status"] != 200),
        "streamed": sum(1 for r in rows if r["stream"]),
        "escalated": escalated,
        "escalation_rate": rate,
        "escalation_health": health,
        "escalation_note": HEALTH_NOTES[health],
        "answered_by_tier": by_tier,
        "tokens_by_tier": tokens,
        "cost_usd": total_cost,
        "cost_per_query_usd": total_cost / len(costs) if costs else None,
        "counterfactual_cost_usd": cf_total if with_cf else None,
        "savings_pct": savings,
        "latency_s": _pct(latency, (0.5, 0.9, 0.95, 0.99)),
        "ttft_s": _pct(ttft, (0.5, 0.9, 0.95, 0.99)),
        "confidence": confidence,
        "gpu_utilization_mean": float(np.mean(utils)) if utils else None,
        "energy_j": float(sum(energy)) if energy else None,
        "bucket": bucket,
        "series": series,
    }


def report(path: Path, since: float | None = None, until: float | None = None, bucket: str = "day",
           calibration_path: Path | None = None, first_tier: str | None = None) -> tuple[dict[str, Any],
                                                                                       list[dict[str, Any]]]:
    """`localroute report`'s one library call: the summary and the rows it came from."""
    rows = read_rows(path, since, until)
    summary = summarize(rows, bucket, load_calibration(calibration_path), first_tier)
    summary["log"] = str(path)
    summary["window"] = {"since": since, "until": until}
    summary["review"] = review_summary(path)
    return summary, rows


def review_summary(path: Path, limit: int = 20) -> dict[str, Any]:
    """The human-review sample (review_sample_rate): how many were marked, which still await feedback."""
    from localroute.feedback import FeedbackStore

    try:
        store = FeedbackStore(path)
        marked = store.review_queue(pending_only=False, limit=1_000_000)
        pending = [r for r in marked if not r["feedback"]]
    except sqlite3.Error:  # a log older than the review migration: nothing sampled
        return {"sampled": 0, "reviewed": 0, "pending": 0, "pending_request_ids": []}
    return {"sampled": len(marked), "reviewed": len(marked) - len(pending), "pending": len(pending),
            "pending_request_ids": [r["request_id"] for r in pending[:limit]]}
