"""The routing log: migrations, one row per request of every kind (through a real server and the
official openai client), no prompt text by default, redaction when opted in, retention, draining."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from localroute.errors import InvalidRequestError
from localroute.monitoring.log_report import read_rows
from localroute.monitoring.record import RequestRecord
from localroute.monitoring.routing_log import COLUMNS, RoutingLog
from localroute.monitoring.sqlite_store import MIGRATIONS, migrate
from localroute.redaction import redact
from localroute.routing.base import Decision, Tier, TierAttempt
from localroute.server.app import create_app
from localroute.types import Generation, GenerationRequest
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend


def test_migrations_from_empty(tmp_path: Path) -> None:
    log = RoutingLog(tmp_path / "a" / "log.db")
    log.close()
    assert log.applied == [name for name, _ in MIGRATIONS]
    conn = sqlite3.connect(tmp_path / "a" / "log.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    assert set(COLUMNS) <= cols
    assert [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")] == [n for n, _ in MIGRATIONS]
    assert migrate(conn) == []  # idempotent
    conn.close()


def test_migrations_from_an_older_schema_keep_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    name, sql = MIGRATIONS[0]
    conn.executescript(sql)
    conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
    conn.execute("INSERT INTO requests (ts, request_id, status, tier, escalated, attempts, cost_usd) "
                 "VALUES (?, 'old-1', 200, 'cheap', 0, '[]', 0.5)", (time.time(),))
    conn.close()
    rows_before = read_rows(path)  # a report can read an old log without upgrading it
    assert rows_before[0]["request_id"] == "old-1" and rows_before[0]["energy_j"] is None

    log = RoutingLog(path)
    log.close()
    assert log.applied == [n for n, _ in MIGRATIONS[1:]]
    (row,) = read_rows(path)
    assert row["request_id"] == "old-1" and row["cost_usd"] == 0.5 and row["disconnected"] == 0


@pytest.fixture()
def logged_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = tmp_path / "routing.db"
    tiers = [
        Tier("unsure", ScriptedBackend("unsure", "maybe", [-3.0, -3.0]), -1.0),
        Tier("sure", ScriptedBackend("sure", "yes", [-0.1]), -1.0),
        Tier("bad", ScriptedBackend("bad", "x", [-1.0], error=InvalidRequestError("the tier rejects this"))),
    ]
    app = create_app(local_settings(routing_log_path=db), tiers=tiers)
    return app, db


def test_one_row_per_request_of_every_kind(logged_server) -> None:  # type: ignore[no-untyped-def]
    app, db = logged_server
    msg = [{"role": "user", "content": "my key is sk-abcdefghijklmnopqrstuvwx, is this fine?"}]
    with serve_app(app) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        client.chat.completions.create(model="localroute/cascade", messages=msg, max_tokens=4)  # escalates
        list(client.chat.completions.create(model="sure", messages=msg, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
        client.completions.create(model="sure", prompt="hello", max_tokens=4)
        list(client.completions.create(model="localroute/cascade", prompt="hello", max_tokens=4, stream=True))
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="bad", messages=msg, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="bad", messages=msg, max_tokens=4, stream=True)
        with pytest.raises(openai.NotFoundError):  # refused before routing: still one row
            client.chat.completions.create(model="no-such-model", messages=msg, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="sure", prompt="hello", max_tokens=0)
    # the server has shut down: every row must be on disk
    rows = read_rows(db)
    rejected = [r for r in rows if r["policy"] == "rejected"]
    assert sorted((r["endpoint"], r["status"]) for r in rejected) == [("chat", 404), ("completion", 400)]
    assert all(r["error"] and r["tier"] is None and r["request_id"] for r in rejected)
    rows = [r for r in rows if r["policy"] != "rejected"]
    assert len(rows) == 6
    by = {(r["endpoint"], bool(r["stream"]), r["status"], r["tier"]): r for r in rows}
    esc = by[("chat", False, 200, "sure")]
    assert esc["escalated"] == 1 and [a["tier"] for a in esc["attempts"]] == ["unsure", "sure"]
    assert esc["attempts"][0]["confidence"] == pytest.approx(-3.0) and esc["attempts"][0]["accepted"] is False
    assert esc["cost_usd"] is not None and esc["attempts"][0]["cost_method"] == "local_cpu"
    assert esc["prompt_tokens"] == 5 and esc["latency_s"] > 0
    assert by[("chat", True, 200, "sure")]["escalated"] == 0
    assert by[("completion", False, 200, "sure")]["request_id"].startswith("cmpl-")
    assert by[("completion", True, 200, "sure")]["escalated"] == 1
    errors = [r for r in rows if r["status"] == 400]
    assert len(errors) == 2 and {bool(r["stream"]) for r in errors} == {True, False}
    assert all(r["error"] and r["tier"] is None for r in errors)
    assert all(r["prompt_text"] is None and r["answer_text"] is None for r in rows)  # off by default


def _record(request_id: str, text: str) -> RequestRecord:
    decision = Decision("p", "mean_logprob", [TierAttempt("t", -0.5, None, True, 3, 2)], answered_by="t")
    gen = Generation(f"answer with password: hunter2 for {text}", [], "stop", 3, 2)
    req = GenerationRequest(messages=({"role": "user", "content": f"token Bearer abcdefghijklmnop123 {text}"},))
    return RequestRecord(request_id, "chat", "p", False, 200, time.perf_counter(), 0.1, 0.05, decision, gen,
                         extra={"request": req})


def test_log_prompts_opt_in_redacts_secrets(tmp_path: Path) -> None:
    log = RoutingLog(tmp_path / "log.db", log_prompts=True)
    log.observe(_record("r1", "sk-proj-ABCDEFGHIJKLMNOPQRSTUV"))
    log.close()
    (row,) = read_rows(tmp_path / "log.db")
    assert "user: token Bearer [redacted]" in row["prompt_text"]
    assert "ABCDEFGHIJKLMNOPQRSTUV" not in row["prompt_text"] and "[redacted:api_key]" in row["prompt_text"]
    assert "hunter2" not in row["answer_text"] and "password: [redacted]" in row["answer_text"]


def test_redact_common_shapes() -> None:
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----"
    text = redact(f"aws AKIAABCDEFGHIJKLMNOP gh ghp_{'a' * 36} api_key='xyz' {key} plain words")
    assert "AKIAABCDEFGHIJKLMNOP" not in text and "ghp_" not in text and "xyz" not in text and "MIIE" not in text
    assert text.endswith("plain words")


def test_close_drains_every_queued_row(tmp_path: Path) -> None:
    log = RoutingLog(tmp_path / "log.db")
    for i in range(500):
        log.observe(_record(f"r{i}", "x"))
    log.close()  # no flush first: close itself must not lose rows
    assert len(read_rows(tmp_path / "log.db")) == 500
    log.observe(_record("late", "x"))  # after close: written synchronously, still not lost
    assert len(read_rows(tmp_path / "log.db")) == 501


def test_decision_evidence_is_logged(tmp_path: Path) -> None:
    """A pre-inference router's score (and any other evidence) is kept with the row, for training."""
    log = RoutingLog(tmp_path / "log.db")
    rec = _record("with-evidence", "x")
    assert rec.decision is not None
    rec.decision.evidence = {"router_score": 0.31, "router": "embedding", "novel": False}
    log.observe(rec)
    log.observe(_record("without", "x"))
    log.close()
    by_id = {r["request_id"]: r for r in read_rows(tmp_path / "log.db")}
    assert by_id["with-evidence"]["evidence"] == {"router_score": 0.31, "router": "embedding", "novel": False}
    assert by_id["without"]["evidence"] is None


@pytest.mark.parametrize("log_prompts", [False, True])
def test_repetition_evidence_quotes_the_answer_only_with_log_prompts(tmp_path: Path, log_prompts: bool) -> None:
    log = RoutingLog(tmp_path / "log.db", log_prompts=log_prompts)
    rec = _record("loop", "x")
    assert rec.decision is not None
    rec.decision.evidence = {"repetition": {"a": {"ngram": "my key sk-abcdef0123456789abcdef,", "repeats": 9,
                                                  "coverage": 1.0}}}
    log.observe(rec)
    log.close()
    logged = read_rows(tmp_path / "log.db")[0]["evidence"]["repetition"]["a"]
    assert logged["repeats"] == 9 and logged["coverage"] == 1.0
    if log_prompts:
        assert "my key" in logged["ngram"] and "sk-abcdef0123456789abcdef" not in logged["ngram"]
    else:
        assert "ngram" not in logged
    assert rec.decision.evidence["repetition"]["a"]["ngram"].startswith("my key")  # the response keeps it


def test_retention_prunes_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    from localroute.monitoring.log_report import read_shadow_pairs

    old = time.time() - 10 * 86400
    log = RoutingLog(path)
    log.observe(_record("new", "x"))
    log.add_pairs([(t, "new", "math", "local", -0.2, -1.0, 1.0, "all", "scored", "numeric", 1.0, 1, None, 0.0, 0.1)
                   for t in (old, time.time())])
    log.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE requests SET ts = ? WHERE request_id = 'new'", (old,))
    conn.close()
    RoutingLog(path, retention_days=30).close()
    assert len(read_rows(path)) == 1 and len(read_shadow_pairs(path)) == 2
    RoutingLog(path, retention_days=7).close()
    assert read_rows(path) == [] and [p["ts"] > old + 86400 for p in read_shadow_pairs(path)] == [True]


def test_window_filter(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    log = RoutingLog(path)
    log.observe(_record("a", "x"))
    log.close()
    now = time.time()
    assert len(read_rows(path, since=now - 60)) == 1
    assert read_rows(path, since=now + 60) == []
    assert read_rows(path, until=now - 60) == []
    assert read_rows(tmp_path / "missing.db") == []


def test_a_spill_file_of_request_rows_and_shadow_pairs_replays_into_sqlite(tmp_path: Path) -> None:
    """The spill file's two line shapes (a request row as a list, as before shadow pairs were
    spilled; a pair as {"shadow_pairs": row}) replay into their tables; a cut line is skipped, and
    a pair replayed twice is stored once."""
    import json

    from localroute.monitoring.log_report import read_shadow_pairs
    from localroute.monitoring.routing_log import PAIR_COLUMNS

    db, spill = tmp_path / "log.db", tmp_path / "spill.jsonl"
    RoutingLog(db).close()
    req = {c: None for c in COLUMNS} | {"ts": time.time(), "request_id": "r0", "stream": 0, "status": 200,
                                       "disconnected": 0}
    pair = [time.time(), "r0", "math", "local", -0.2, -1.0, 0.5, "all", "scored", "numeric", 1.0, 1, None, 0.0, 0.1]
    assert len(pair) == len(PAIR_COLUMNS)
    lines = [json.dumps([req[c] for c in COLUMNS]), json.dumps({"shadow_pairs": pair}),
             json.dumps({"shadow_pairs": pair}), '{"shadow_pa']
    spill.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = RoutingLog(db, spill_path=spill)
    log.observe(RequestRecord("r1", "chat", "localroute/cascade", False, 200, time.perf_counter(), 0.01))
    log.add_pairs([[time.time(), "r1", *pair[2:]]])
    log.close()
    assert spill.read_text() == "" and log.replayed_total == 3
    assert [r["request_id"] for r in read_rows(db)] == ["r0", "r1"]
    assert [(p["request_id"], p["sample_rate"]) for p in read_shadow_pairs(db)] == [("r0", 0.5), ("r1", 0.5)]
