"""The routing log in a real PostgreSQL (tests/services.py): the same named migrations as SQLite,
rows, feedback and shadow pairs written and read through the same interface, live quality and
`calibrate --from-log` equal to the same rows in SQLite, day partitions dropped by retention, and
rows and pairs spilled while the server is down and replayed, none lost or doubled."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localroute.monitoring.feedback import FeedbackRequest, FeedbackStore
from localroute.monitoring.log_report import read_rows, read_shadow_pairs, report
from localroute.monitoring.postgres_log import POSTGRES_MIGRATIONS, PostgresLogStore
from localroute.monitoring.record import RequestRecord
from localroute.monitoring.routing_log import COLUMNS, PAIR_COLUMNS, RoutingLog, open_store
from localroute.monitoring.sqlite_store import MIGRATIONS
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


def _pair(
    ts: float, request_id: str, agrees: int = 1, rate: float = 1.0, conf: float = -0.2
) -> tuple[object, ...]:
    """A shadow_pairs row (PAIR_COLUMNS)."""
    return (
        ts,
        request_id,
        "math",
        "local",
        conf,
        -1.0,
        rate,
        "all",
        "scored",
        "numeric",
        float(agrees),
        agrees,
        None,
        0.001,
        0.2,
    )


def _cascade_record(i: int, conf: float = -0.2, category: str = "math") -> RequestRecord:
    from localroute.routing.base import Decision, TierAttempt

    d = Decision(
        "localroute/cascade",
        "mean_logprob",
        [TierAttempt("local", conf, -1.0, True)],
        "local",
        evidence={"category": category},
    )
    return RequestRecord(
        f"r{i}", "chat", "localroute/cascade", False, 200, time.perf_counter(), 0.1, decision=d
    )


def _same_log(target: str | Path, n: int, spill: Path | None = None) -> list[tuple[object, ...]]:
    """n cascade requests of category math answered locally, every one shadowed (3 of 4 agreeing,
    drawn at two rates), and human feedback overriding the frontier on r1 (correct where it disagreed)."""
    confs = [-0.9 + 0.8 * i / (n - 1) for i in range(n)]
    now = time.time()
    pairs = [
        _pair(now + i * 1e-3, f"r{i}", int(i % 4 != 1), 0.5 if i % 2 else 1.0, conf)
        for i, conf in enumerate(confs)
    ]
    log = RoutingLog(target, spill_path=spill, batch_s=0.01)
    for i, conf in enumerate(confs):
        log.observe(_cascade_record(i, conf))
    log.add_pairs(pairs)
    log.close()
    FeedbackStore(target).add(FeedbackRequest(request_id="r1", correct=True))
    return pairs


def test_shadow_pairs_written_and_read_back_through_postgres(pg: PostgresServer, tmp_path: Path) -> None:
    """Pairs queued on the routing log's writer land in PostgreSQL's day-partitioned table, read back
    as SQLite's are (same columns, oldest first, with the feedback's label); a replay is stored once."""
    url = _fresh_db(pg, "log_pairs")
    pairs = _same_log(url, 8)
    got = read_shadow_pairs(url)
    assert [tuple(p[c] for c in PAIR_COLUMNS) for p in got] == pairs
    assert [p["label"] for p in got] == [
        1,
        1,
        1,
        1,
        1,
        0,
        1,
        1,
    ]  # r1: feedback beats the frontier; r5 disagrees
    assert read_shadow_pairs(url, since=pairs[4][0]) == got[4:]
    store = open_store(url)
    assert isinstance(store, PostgresLogStore)
    assert len(store.partitions("shadow_pairs")) >= 3
    store.insert_pairs(pairs[:3])  # a spilled batch replayed twice
    assert len(store.read_shadow_pairs()) == 8
    store.close()
    sqlite = tmp_path / "routing.db"
    _same_log(sqlite, 8)
    from_sqlite = read_shadow_pairs(sqlite)
    assert [{k: v for k, v in p.items() if k not in ("id", "ts")} for p in from_sqlite] == [
        {k: v for k, v in p.items() if k not in ("id", "ts")} for p in got
    ]


def test_live_quality_from_postgres_equals_sqlite(pg: PostgresServer, tmp_path: Path) -> None:
    """`localroute report`'s live quality on a PostgreSQL log is the one of the same rows in SQLite."""
    url = _fresh_db(pg, "log_live_quality")
    sqlite = tmp_path / "routing.db"
    _same_log(url, 40)
    _same_log(sqlite, 40)
    from_pg, _ = report(url)
    from_sqlite, _ = report(sqlite)
    math = from_pg["live_quality"]["categories"]["math"]
    assert math["pairs"] == 40 and math["draws"] == {"scored": 40} and math["answered"] == 40
    # reweighted: the 9 disagreements left (r1 overridden) were all drawn at 0.5, so weigh 2: 1 - 18/60
    assert (
        math["kept_agreement"] == pytest.approx(0.7)
        and math["interval"] == "clopper-pearson at Kish effective n"
    )
    assert from_pg["live_quality"] == from_sqlite["live_quality"]
    assert from_pg["categories"] == from_sqlite["categories"]


def test_calibrate_from_log_reads_postgres(
    pg: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`localroute calibrate --from-log postgresql://...` refits from the pairs stored there, to the
    thresholds the same rows in SQLite give."""
    import json

    monkeypatch.setenv("LOCALROUTE_CONFIDENCE_AGGREGATOR", "mean_logprob")  # the file's and the rows' signal

    from localroute.cli import main
    from tests.server.test_live_quality import _calibration

    url = _fresh_db(pg, "log_calibrate")
    sqlite = tmp_path / "routing.db"
    _same_log(url, 80)
    _same_log(sqlite, 80)
    out = {}
    for name, target in (("pg", url), ("sqlite", str(sqlite))):
        cal = tmp_path / f"calibration-{name}.json"
        _calibration(cal, -1.0, {"math": -0.05})
        assert (
            main(
                [
                    "calibrate",
                    "--from-log",
                    target,
                    "--target-quality",
                    "0.7",
                    "--delta",
                    "0.1",
                    "--out",
                    str(cal),
                    "--json",
                ]
            )
            == 0
        )
        out[name] = json.loads(capsys.readouterr().out)
    refit = out["pg"]["tiers"]["local"]["math"]
    assert out["pg"]["log"].startswith("postgresql://") and refit["pairs"] == 80 and refit["fallback"] is None
    assert refit == out["sqlite"]["tiers"]["local"]["math"]


def test_postgres_down_shadow_pairs_spill_and_replay(pg: PostgresServer, tmp_path: Path) -> None:
    """Pairs handed over while the database is down go to the spill file with the request rows and
    are replayed, in order, once it is back: none lost, none doubled."""
    url = _fresh_db(pg, "log_pairs_spill")
    spill = tmp_path / "spill.jsonl"
    log = RoutingLog(url, spill_path=spill, batch_s=0.01)
    now = time.time()
    log.add_pairs([_pair(now, "r0")])
    log.flush()
    pg.stop()
    try:
        for i in range(1, 6):
            log.observe(_cascade_record(i))
            log.add_pairs([_pair(now + i, f"r{i}")])
        log.flush()
        assert log.spilled_total == 10
        assert sum('"shadow_pairs"' in line for line in spill.read_text().splitlines()) == 5
    finally:
        pg.start()
    log.add_pairs([_pair(now + 6, "r6")])
    log.flush()
    log.close()
    assert log.replayed_total == 10 and spill.read_text() == ""
    assert [p["request_id"] for p in read_shadow_pairs(url)] == [f"r{i}" for i in range(7)]
    assert sorted(r["request_id"] for r in read_rows(url)) == [f"r{i}" for i in range(1, 6)]


def test_every_sqlite_migration_has_its_postgres_twin() -> None:
    """The hook for new tables: a migration added to sqlite_store.MIGRATIONS without its
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
    store.insert_pairs([_pair(old, "old"), _pair(time.time(), "new")])
    store.put_response("resp_old", old, '{"id": "resp_old"}', "[]")
    store.put_response("resp_new", time.time(), '{"id": "resp_new"}', "[]", retention_days=5)
    assert store.get_response("resp_old") == ('{"id": "resp_old"}', "[]")  # dropped by prune, not by a put
    before = store.partitions("requests")
    assert store.count_requests() == 1 and len(before) == 4 and len(store.partitions("shadow_pairs")) == 4
    assert len(store.partitions("responses")) == 4
    # the old day's requests, feedback, shadow_pairs and responses partitions
    assert store.prune(retention_days=5) == 4
    assert store.count_requests() == 0 and len(store.partitions("requests")) == 3
    assert [p["request_id"] for p in store.read_shadow_pairs()] == ["new"]
    assert store.get_response("resp_old") is None and store.get_response("resp_new") == ('{"id": "resp_new"}', "[]")
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


def test_shadow_evaluator_pairs_reach_postgres_through_the_writer(pg: PostgresServer, tmp_path: Path) -> None:
    """What `serve` wires up with routing_log_url: the shadow evaluator (against a real frontier
    stand-in on 127.0.0.1) hands its pairs to the routing log's writer, which stores them in PostgreSQL."""
    import asyncio

    from tests.fault_upstream import Fault, FaultUpstream
    from tests.monitoring.test_shadow import evaluator, record

    url = _fresh_db(pg, "log_shadow_writer")
    log = RoutingLog(url, spill_path=tmp_path / "spill.jsonl", batch_s=0.01)
    with FaultUpstream(Fault(text="Positive.")) as up:

        async def main() -> dict[str, int]:
            shadow = evaluator(up.url, None, sink=log.add_pairs)
            shadow.start()
            shadow.observe(record(1, "positive"))
            shadow.observe(record(2, "negative"))
            await shadow.drain()
            await shadow.aclose()
            return shadow.stats

        stats = asyncio.run(main())
    log.close()
    assert stats["scored"] == 2
    got = sorted(read_shadow_pairs(url), key=lambda p: p["request_id"])
    assert [(p["request_id"], p["status"], p["agrees"], p["sample_rate"]) for p in got] == [
        ("chatcmpl-1", "scored", 1, 1.0),
        ("chatcmpl-2", "scored", 0, 1.0),
    ]
    assert all(p["cost_usd"] > 0 for p in got)


def test_the_store_target_never_shows_a_password() -> None:
    from localroute.monitoring.postgres_log import PostgresLogStore

    for url in ("postgresql://u:hunter2@db:5432/log", "postgresql://u@db/log?sslmode=require&password=hunter2"):
        shown = PostgresLogStore(url, columns=(), migration_names=()).target
        assert "hunter2" not in shown and "db" in shown


def test_a_row_postgres_refuses_is_set_aside_and_never_holds_up_the_rest(pg: PostgresServer, tmp_path: Path) -> None:
    """A value PostgreSQL refuses (an integer out of range) is not a server that is down: the
    row goes to `<spill>.rejected`, the rest of its batch and every later row are stored, nothing
    spills; a NUL character (text PostgreSQL cannot hold) is stored as U+FFFD."""
    url = _fresh_db(pg, "log_refused")
    spill = tmp_path / "spill.jsonl"
    log = RoutingLog(url, spill_path=spill, batch_s=0.5)
    bad = RequestRecord("chatcmpl-bad", "chat", "localroute/cascade", False, 2**40, time.perf_counter(), 0.01)
    nul = RequestRecord("chatcmpl-\x00nul", "chat", "localroute/cascade", False, 200, time.perf_counter(), 0.01)
    for record in (_record(0), bad, nul, _record(1)):
        log.observe(record)
    log.flush()
    for i in range(2, 4):
        log.observe(_record(i))
    log.flush()
    log.close()
    ids = sorted(r["request_id"] for r in read_rows(url))
    assert ids == sorted(["chatcmpl-0", "chatcmpl-1", "chatcmpl-2", "chatcmpl-3", "chatcmpl-\ufffdnul"])
    assert log.rejected_total == 1 and log.spilled_total == 0 and not spill.exists()
    rejected = (tmp_path / "spill.jsonl.rejected").read_text().splitlines()
    assert len(rejected) == 1 and "chatcmpl-bad" in rejected[0]


def test_009_upgrades_a_log_at_008_once_with_replicas_migrating_together(
        pg: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database an earlier release made (001-008: rows in requests, 006's unpartitioned and
    unused responses table): replicas starting together apply 009 once (the advisory lock), the
    requests rows stay, and the new responses table is day-partitioned and usable; a later open
    applies nothing."""
    from concurrent.futures import ThreadPoolExecutor

    url = _fresh_db(pg, "upgrade_009")
    names = [n for n, _ in MIGRATIONS]
    with monkeypatch.context() as m:  # the earlier release: its migrations and partitioned tables
        m.setattr("localroute.monitoring.postgres_log.PARTITIONED", ("requests", "feedback", "shadow_pairs"))
        old = PostgresLogStore(url, COLUMNS, names[: names.index("008_shadow_pairs_through_store") + 1],
                               PAIR_COLUMNS)
        assert "009_responses_by_day" not in old.migrate()
        row = {c: None for c in COLUMNS} | {"ts": time.time(), "request_id": "chatcmpl-old", "status": 200,
                                            "stream": 0, "disconnected": 0}
        old.insert([tuple(row[c] for c in COLUMNS)])
        old.close()

    def start(_: int) -> list[str]:
        store = open_store(url)
        try:
            return store.migrate()
        finally:
            store.close()

    with ThreadPoolExecutor(4) as pool:  # .result() raises what a replica's migrate raised
        applied = [f.result(60) for f in [pool.submit(start, i) for i in range(4)]]
    assert sorted(map(tuple, applied)) == [(), (), (), ("009_responses_by_day",)]
    store = open_store(url)
    assert isinstance(store, PostgresLogStore) and store.migrate() == []
    assert store.count_requests() == 1 and len(store.partitions("responses")) == 3
    store.put_response("resp_1", time.time(), '{"id": "resp_1"}', "[]")
    assert store.get_response("resp_1") == ('{"id": "resp_1"}', "[]")
    store.close()
