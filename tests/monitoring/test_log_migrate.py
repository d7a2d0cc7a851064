"""`localroute log migrate`: a SQLite routing log written by the real writer (requests, feedback,
review marks, stored Responses, shadow pairs) copied into a real PostgreSQL (tests/services.py):
every table's rows equal after the copy, a rerun copies nothing, rows added since are the only
ones a later run copies, `report` on both gives the same summary, and a target at other
migrations than this localroute's, or a source newer than it, is refused before anything is written."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localroute.cli import main
from localroute.errors import ConfigError
from localroute.monitoring.feedback import FeedbackRequest, FeedbackStore
from localroute.monitoring.log_migrate import TABLES, migrate_log
from localroute.monitoring.log_report import report
from localroute.monitoring.postgres_log import PostgresLogStore
from localroute.monitoring.response_store import ResponseStore
from localroute.monitoring.routing_log import COLUMNS, PAIR_COLUMNS, RoutingLog
from localroute.monitoring.sqlite_store import MIGRATIONS, SQLiteLogStore
from tests.monitoring.test_postgres_log import _cascade_record, _fresh_db, _pair
from tests.services import PostgresServer, postgres_server

DAY = 86400.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def _write_log(path: Path, start: int, n: int) -> None:
    """n cascade requests (r{start}..), their shadow pairs, feedback on every third, a review mark
    on every fourth, a stored Response on every other, through the writers the server uses."""
    log = RoutingLog(path, batch_s=0.01)
    for i in range(start, start + n):
        log.observe(_cascade_record(i, -0.9 + 0.8 * (i % 10) / 9, "math" if i % 2 else "code"))
    now = time.time()
    log.add_pairs([_pair(now + i * 1e-3, f"r{i}", int(i % 3 != 0), 0.5 if i % 2 else 1.0) for i in
                   range(start, start + n)])
    log.close()
    feedback, responses = FeedbackStore(path), ResponseStore(path)
    for i in range(start, start + n):
        if i % 3 == 0:
            feedback.add(FeedbackRequest(request_id=f"r{i}", correct=bool(i % 2), source="human"))
        if i % 4 == 0:
            feedback.mark_review(f"r{i}", "localroute/cascade", "local")
        if i % 2 == 0:
            responses.put(f"resp_{i}", {"id": f"resp_{i}", "object": "response", "output_text": f"answer {i}"},
                          [{"role": "user", "content": f"question {i}"}])
    feedback.close()
    responses.close()


def _old_rows(path: Path, days: tuple[int, ...]) -> None:
    """Requests rows from days ago (their day partitions do not exist in the target yet)."""
    store = SQLiteLogStore(path, COLUMNS, PAIR_COLUMNS)
    now = time.time()
    rows = []
    for d in days:
        row = dict.fromkeys(COLUMNS)
        row.update(ts=now - d * DAY, request_id=f"old{d}", endpoint="chat", policy="localroute/cascade", stream=0,
                   status=200, tier="local", escalated=0, attempts="[]", disconnected=0)
        rows.append(tuple(row[c] for c in COLUMNS))
    store.insert(rows)
    store.close()


def _rows(conn: Any, table: str, key: tuple[str, ...]) -> list[dict[str, Any]]:
    """A table's rows without the database's own ids, in key order."""
    cur = conn.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cur.description]
    rows = [{k: v for k, v in zip(names, r) if not (k == "id" and table != "review_sample")} for r in cur.fetchall()]
    return sorted(rows, key=lambda r: tuple(r[k] for k in key))


def _tables(sqlite_path: Path, url: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    import psycopg

    src = sqlite3.connect(sqlite_path)
    with psycopg.connect(url) as dst:
        out = ({t.name: _rows(src, t.name, t.key) for t in TABLES}, {t.name: _rows(dst, t.name, t.key) for t in TABLES})
    src.close()
    return out


def _counts(result: Any, field: str) -> dict[str, int]:
    return {name: getattr(c, field) for name, c in result.tables.items()}


def test_every_table_is_copied_once_and_reads_the_same(pg: PostgresServer, tmp_path: Path) -> None:
    path = tmp_path / "routing.db"
    _write_log(path, 0, 24)
    _old_rows(path, (3, 40))
    url = _fresh_db(pg, "migrate_all")
    sizes = {"requests": 26, "feedback": 8, "review_sample": 6, "responses": 12, "shadow_pairs": 24}

    dry = migrate_log(path, url, dry_run=True, batch_size=5)
    assert _counts(dry, "source") == sizes and _counts(dry, "copied") == sizes and dry.applied == []
    import psycopg

    with psycopg.connect(url) as conn:  # a dry run writes nothing, not even the schema
        assert conn.execute("SELECT to_regclass('_migrations')").fetchone() == (None,)

    seen: list[tuple[str, int, int]] = []
    done = migrate_log(path, url, batch_size=5, progress=lambda *a: seen.append(a))
    assert done.applied == [name for name, _ in MIGRATIONS]  # an empty target gets the schema
    assert _counts(done, "copied") == sizes and _counts(done, "present") == dict.fromkeys(sizes, 0)
    assert [s for s in seen if s[0] == "requests"] == [("requests", n, 26) for n in (5, 10, 15, 20, 25, 26)]
    source, target = _tables(path, url)
    assert {t: len(rows) for t, rows in target.items()} == sizes
    assert source == target  # every column of every row, the ids apart
    store = PostgresLogStore(url, COLUMNS, [n for n, _ in MIGRATIONS], PAIR_COLUMNS)
    assert {p.rsplit("_d", 1)[1] for p in store.partitions("requests")} >= {
        time.strftime("%Y%m%d", time.gmtime(time.time() - d * DAY)) for d in (0, 3, 40)}
    store.close()

    again = migrate_log(path, url, batch_size=5)  # a rerun copies nothing
    assert _counts(again, "copied") == dict.fromkeys(sizes, 0) and _counts(again, "present") == sizes
    assert _tables(path, url)[1] == target

    pg_summary, _ = report(url)
    sqlite_summary, _ = report(path)
    assert pg_summary.pop("log") != sqlite_summary.pop("log")
    assert pg_summary["requests"] == 26 and pg_summary["review"]["sampled"] == 6
    assert pg_summary["live_quality"]["categories"]  # the shadow pairs' figures are there too
    assert pg_summary == sqlite_summary


def test_a_later_run_copies_only_the_rows_written_since(pg: PostgresServer, tmp_path: Path) -> None:
    """The log keeps growing (a server still on SQLite) and replicas already write into the target:
    the second run copies the new rows only, next to the replicas' own."""
    path = tmp_path / "routing.db"
    url = _fresh_db(pg, "migrate_later")
    _write_log(path, 0, 8)
    migrate_log(path, url)
    replica = RoutingLog(url, batch_s=0.01)  # a replica on PostgreSQL, with ids of its own
    replica.observe(_cascade_record(100))
    replica.close()
    _write_log(path, 8, 4)
    later = migrate_log(path, url, batch_size=3)
    assert _counts(later, "copied") == {"requests": 4, "feedback": 1, "review_sample": 1, "responses": 2,
                                        "shadow_pairs": 4}
    source, target = _tables(path, url)
    assert [r for r in target["requests"] if r["request_id"] != "r100"] == source["requests"]
    assert {t: target[t] for t in target if t != "requests"} == {t: source[t] for t in source if t != "requests"}
    import psycopg

    with psycopg.connect(url) as conn:  # the target's ids stay unique
        ids = [r[0] for r in conn.execute("SELECT id FROM requests").fetchall()]
    assert len(ids) == len(set(ids)) == 13


def test_a_target_at_other_migrations_or_a_newer_source_is_refused(pg: PostgresServer, tmp_path: Path) -> None:
    import psycopg

    path = tmp_path / "routing.db"
    _write_log(path, 0, 4)
    names = [n for n, _ in MIGRATIONS]
    older = _fresh_db(pg, "migrate_older")
    PostgresLogStore(older, COLUMNS, names, PAIR_COLUMNS).migrate()
    with psycopg.connect(older, autocommit=True) as conn:  # as an older localroute's replicas left it
        conn.execute("DELETE FROM _migrations WHERE name = %s", (names[-1],))
    with pytest.raises(ConfigError, match=rf"older schema \(migration {names[-1]} not applied\)"):
        migrate_log(path, older)
    newer = _fresh_db(pg, "migrate_newer")
    PostgresLogStore(newer, COLUMNS, names, PAIR_COLUMNS).migrate()
    with psycopg.connect(newer, autocommit=True) as conn:
        conn.execute("INSERT INTO _migrations VALUES ('999_future', 0)")
    with pytest.raises(ConfigError, match="newer schema than this localroute .migration 999_future"):
        migrate_log(path, newer, dry_run=True)
    for url in (older, newer):  # nothing copied
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (0,)

    fresh = _fresh_db(pg, "migrate_from_newer")
    lite = sqlite3.connect(path, isolation_level=None)
    lite.execute("INSERT INTO _migrations VALUES ('999_future', 0)")
    lite.close()
    with pytest.raises(ConfigError, match="written by a newer localroute"):
        migrate_log(path, fresh)
    with pytest.raises(ConfigError, match="must be a postgresql:// URL"):
        migrate_log(path, str(tmp_path / "other.db"))
    with pytest.raises(ConfigError, match="source must be a SQLite routing log"):
        migrate_log(fresh, fresh)
    with pytest.raises(ConfigError, match="routing log not found"):
        migrate_log(tmp_path / "missing.db", fresh)
    ok = tmp_path / "ok.db"
    RoutingLog(ok).close()
    with pytest.raises(ConfigError, match=r"cannot connect to postgresql://u:\S+@127.0.0.1:1/x: .*refused") as err:
        migrate_log(ok, "postgresql://u:secret-pw@127.0.0.1:1/x")
    assert "secret-pw" not in err.value.message


def test_cli_prints_counts_and_dry_run_writes_nothing(pg: PostgresServer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = tmp_path / "routing.db"
    _write_log(path, 0, 6)
    url = _fresh_db(pg, "migrate_cli")
    assert main(["log", "migrate", "--from", str(path), "--to", url, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out and "would copy" in out
    assert main(["log", "migrate", "--from", f"sqlite:///{path}", "--to", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"target was empty: {len(MIGRATIONS)} migrations applied"
    assert lines[3].split() == ["requests", "6", "6", "0"] and lines[7].split() == ["shadow_pairs", "6", "6", "0"]
    assert main(["log", "migrate", "--from", str(path), "--to", url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tables"]["requests"] == {"source": 6, "copied": 0, "already_in_target": 6}
    assert data["target"].startswith("postgresql://") and data["dry_run"] is False
    assert main(["log", "migrate", "--from", str(path)]) == 2  # no target configured
    assert "no target: pass --to" in capsys.readouterr().err


def test_every_table_of_the_log_is_one_the_migration_copies(tmp_path: Path) -> None:
    """The hook for new tables: one added to sqlite_store.MIGRATIONS but not to log_migrate.TABLES
    (with its key) makes this fail, instead of `log migrate` leaving its rows behind."""
    path = tmp_path / "routing.db"
    RoutingLog(path).close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables - {"_migrations"} == {t.name for t in TABLES}


def test_an_older_source_is_copied_as_it_is(pg: PostgresServer, tmp_path: Path) -> None:
    """A log an older localroute left at migration 003 (no evidence column, no feedback or later
    tables): its rows are copied, the columns it lacks at the target's defaults, the tables it lacks
    counted as empty; the source is not upgraded (it is only read)."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, sql in MIGRATIONS[:3]:
        conn.executescript(sql)
        conn.execute("INSERT INTO _migrations VALUES (?, 0)", (name,))
    conn.execute("INSERT INTO requests (ts, request_id, status, tier) VALUES (?, 'old1', 200, 'local')",
                 (time.time(),))
    conn.close()
    url = _fresh_db(pg, "migrate_old_source")
    done = migrate_log(path, url)
    assert _counts(done, "copied") == {"requests": 1, "feedback": 0, "review_sample": 0, "responses": 0,
                                       "shadow_pairs": 0}
    import psycopg

    with psycopg.connect(url) as pgc:
        assert pgc.execute("SELECT request_id, tier, evidence, disconnected FROM requests").fetchall() == [
            ("old1", "local", None, 0)]
    lite = sqlite3.connect(path)
    assert [r[0] for r in lite.execute("SELECT name FROM _migrations")] == [n for n, _ in MIGRATIONS[:3]]
    lite.close()


def test_a_second_migration_into_the_same_database_meanwhile_is_refused(pg: PostgresServer, tmp_path: Path) -> None:
    """Two runs at once would both find a feedback row absent and both insert it (those tables have
    no unique key): the one that comes second is refused while the first holds the database, and
    runs once it is free; a dry run (which writes nothing) is never refused."""
    import psycopg

    from localroute.monitoring.log_migrate import MIGRATE_LOCK

    path = tmp_path / "routing.db"
    url = _fresh_db(pg, "migrate_concurrent")
    _write_log(path, 0, 4)
    with psycopg.connect(url, autocommit=True) as first:  # stands for a run in progress
        first.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        with pytest.raises(ConfigError, match="another `localroute log migrate`"):
            migrate_log(path, url)
        assert _counts(migrate_log(path, url, dry_run=True), "copied")["requests"] == 4
    done = migrate_log(path, url)
    assert _counts(done, "copied")["requests"] == 4
    again = migrate_log(path, url)  # its own lock went with its connection
    assert _counts(again, "copied")["requests"] == 0
