"""The routing log in a real PostgreSQL (tests/services.py): the same named migrations as SQLite,
rows and feedback written and read through the same interface, day partitions dropped by
retention, and rows spilled while the server is down and replayed, none lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localroute.monitoring.feedback import FeedbackRequest, FeedbackStore
from localroute.monitoring.log_report import read_rows, report
from localroute.monitoring.postgres_log import POSTGRES_MIGRATIONS, PostgresLogStore
from localroute.monitoring.record import RequestRecord
from localroute.monitoring.routing_log import COLUMNS, MIGRATIONS, RoutingLog, open_store
from tests.services import PostgresServer, postgres_server


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def _fresh_db(pg: PostgresServer, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def _record(i: int) -> RequestRecord:
    return RequestRecord(f"chatcmpl-{i}", "chat", "localroute/cascade", False, 200, time.perf_counter(), 0.01)


def test_every_sqlite_migration_has_its_postgres_twin() -> None:
    """The hook for new tables: a migration added to routing_log.MIGRATIONS without its
    PostgreSQL version here makes this fail (and the store refuse to open)."""
    assert [n for n, _ in MIGRATIONS] == list(POSTGRES_MIGRATIONS)
    with pytest.raises(Exception, match="no PostgreSQL version of migration"):
        PostgresLogStore("postgresql://x@127.0.0.1:1/x", COLUMNS, [*POSTGRES_MIGRATIONS, "999_new_table"])


def test_rows_feedback_and_report_through_postgres(pg: PostgresServer, tmp_path: Path) -> None:
    url = _fresh_db(pg, "log_rows")
    log = RoutingLog(url, spill_path=tmp_path / "spill.jsonl", batch_s=0.01)
    assert log.applied == list(POSTGRES_MIGRATIONS)
    assert RoutingLog(url).applied == []  # a second replica: nothing left to apply
    for i in range(5):
        log.observe(_record(i))
    log.flush()
    fb = FeedbackStore(url)
    stored = fb.add(FeedbackRequest(request_id="chatcmpl-3", correct=True))
    assert stored["policy"] == "localroute/cascade" and stored["score"] == 1.0
    with pytest.raises(Exception, match="no logged request"):
        FeedbackStore(url, lookup_wait_s=0.1).add(FeedbackRequest(request_id="nope", score=0.5))
    log.close()
    rows = read_rows(url)
    assert [r["request_id"] for r in rows] == [f"chatcmpl-{i}" for i in range(5)]
    summary, _ = report(url)
    assert summary["log"].startswith("postgresql://") and ":" not in summary["log"].split("@")[0][13:]
    store = open_store(url)
    assert store.count_requests() == 5 and len(store.partitions("requests")) >= 3
    store.close()


def test_retention_drops_day_partitions(pg: PostgresServer) -> None:
    url = _fresh_db(pg, "log_retention")
    store = open_store(url)
    assert isinstance(store, PostgresLogStore)
    store.migrate()
    old = time.time() - 10 * 86400
    row = {c: None for c in COLUMNS} | {
        "ts": old,
        "request_id": "old",
        "stream": 0,
        "status": 200,
        "disconnected": 0,
    }
    store.insert([tuple(row[c] for c in COLUMNS)])
    before = store.partitions("requests")
    assert store.count_requests() == 1 and len(before) == 4
    assert store.prune(retention_days=5) == 2  # the old day's requests and feedback partitions
    assert store.count_requests() == 0 and len(store.partitions("requests")) == 3
    store.close()


def test_postgres_down_rows_spill_and_replay_none_lost(pg: PostgresServer, tmp_path: Path) -> None:
    url = _fresh_db(pg, "log_spill")
    spill = tmp_path / "spill.jsonl"
    log = RoutingLog(url, spill_path=spill, batch_s=0.01)
    for i in range(10):
        log.observe(_record(i))
    log.flush()
    pg.stop()
    try:
        for i in range(10, 30):
            log.observe(_record(i))
        log.flush()
        assert log.spilled_total == 20 and spill.stat().st_size > 0
    finally:
        pg.start()
    for i in range(30, 35):  # the next batch replays the spilled rows first, in order
        log.observe(_record(i))
    log.flush()
    log.close()
    assert log.replayed_total == 20 and spill.read_text() == ""
    ids = [r["request_id"] for r in read_rows(url)]
    assert sorted(ids) == sorted(f"chatcmpl-{i}" for i in range(35)) and len(ids) == 35


def test_train_from_log_reads_postgres(pg: PostgresServer, tmp_path: Path) -> None:
    """`localroute train --from-log postgresql://...`: requests with prompt text and feedback."""
    from localroute.monitoring.log_report import from_routing_log

    url = _fresh_db(pg, "log_train")
    store = open_store(url)
    store.migrate()
    row = {c: None for c in COLUMNS} | {
        "ts": time.time(),
        "request_id": "r1",
        "stream": 0,
        "status": 200,
        "disconnected": 0,
        "tier": "frontier",
        "prompt_text": "user: is it good?",
    }
    store.insert([tuple(row[c] for c in COLUMNS)])
    store.add_feedback(time.time(), "r1", 0.75, None, "human")
    store.close()
    data = from_routing_log(url, ["local", "frontier"])
    assert (
        data.texts == ["is it good?"]
        and data.labels[0][1] == 0.75
        and data.source.startswith("log:postgresql")
    )


def test_a_replica_starts_while_postgres_is_down(pg: PostgresServer, tmp_path: Path) -> None:
    """Start-up does not need the database: rows spill, feedback is a clean 503, and once the
    server is back the log migrates and the rows are replayed."""
    from localroute.errors import BackendUnavailableError

    url = _fresh_db(pg, "log_down_at_start")
    pg.stop()
    try:
        log = RoutingLog(url, spill_path=tmp_path / "spill.jsonl", batch_s=0.01)
        fb = FeedbackStore(url)
        for i in range(3):
            log.observe(_record(i))
        log.flush()
        assert log.spilled_total == 3
        with pytest.raises(BackendUnavailableError) as info:
            fb.add(FeedbackRequest(request_id="chatcmpl-0", score=1.0))
        assert info.value.status_code == 503 and info.value.code == "routing_log_unavailable"
    finally:
        pg.start()
    log.observe(_record(3))
    log.flush()
    log.close()
    assert sorted(r["request_id"] for r in read_rows(url)) == [f"chatcmpl-{i}" for i in range(4)]
    assert fb.add(FeedbackRequest(request_id="chatcmpl-0", score=1.0))["score"] == 1.0
