"""Copy a SQLite routing log into PostgreSQL (`localroute log migrate`): the step from one node
(the embedded SQLite file) to replicas sharing `routing_log_url`.

- Every table the log holds: `requests`, `feedback`, `review_sample`, the stored Responses
  (`responses`) and `shadow_pairs`, in batches, the source read-only. Budget spend is not in the
  log (`budget_state_path`, a file of its own; Redis with replicas) and is not copied.
- Idempotent: a row is copied only when its key is not in the target yet (requests, feedback and
  shadow pairs: `(request_id, ts)`; review marks: `request_id`; stored Responses: `response_id`).
  A rerun, or a run after the replicas have started writing to the target, copies nothing twice.
  Ids are the target's own: its replicas may already have used the source's.
- The target must be at exactly this localroute's migrations (sqlite_store.MIGRATIONS), or empty
  (then they are applied, as `serve` would). One older (an older localroute's replicas) or newer
  (a newer one's) is refused: copying columns into a schema that differs would lose or misplace
  them. A source newer than this localroute is refused too; an older one is copied as it is (the
  columns it lacks take the target's defaults).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localroute.errors import ConfigError
from localroute.monitoring.postgres_log import PostgresLogStore, clean_row, is_postgres_url
from localroute.monitoring.routing_log import COLUMNS, PAIR_COLUMNS
from localroute.monitoring.sqlite_store import MIGRATIONS

__all__ = ["TABLES", "MigrationResult", "TableCount", "migrate_log"]


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    key: tuple[str, ...]  # what makes a row the same row in both databases
    own_id: bool = False  # an `id` the target generates itself (not copied)


# in this order: a request's row before its feedback
TABLES: tuple[_Table, ...] = (
    _Table("requests", ("request_id", "ts"), own_id=True),
    _Table("feedback", ("request_id", "ts"), own_id=True),
    _Table("review_sample", ("request_id",)),
    _Table("responses", ("response_id",)),
    _Table("shadow_pairs", ("request_id", "ts"), own_id=True),
)


@dataclass(slots=True)
class TableCount:
    """One table's figures: rows in the source, copied now, found already in the target."""

    source: int = 0
    copied: int = 0
    present: int = 0


@dataclass(slots=True)
class MigrationResult:
    source: str
    target: str
    dry_run: bool
    applied: list[str] = field(default_factory=list)  # migrations applied to an empty target
    tables: dict[str, TableCount] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "dry_run": self.dry_run,
                "applied_migrations": self.applied,
                "tables": {t: {"source": c.source, "copied": c.copied, "already_in_target": c.present}
                           for t, c in self.tables.items()}}


Progress = Callable[[str, int, int], None]  # (table, rows read so far, rows in the source table)


# the session-level advisory lock one migration into a database holds (released with its connection)
MIGRATE_LOCK = 0x6C6F67_6D6967  # "logmig"


def migrate_log(source: str | Path, target: str, dry_run: bool = False, batch_size: int = 1000,
                progress: Progress | None = None) -> MigrationResult:
    """Copy the SQLite log at `source` into the PostgreSQL log at `target` (see the module's
    docstring); `dry_run` only counts what would be copied, writing nothing."""
    if batch_size < 1:
        raise ConfigError("batch size must be at least 1", param="batch_size")
    path = _source_path(source)
    if not is_postgres_url(target):
        raise ConfigError(f"the target must be a postgresql:// URL, not {target!r}", param="to")
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    store = PostgresLogStore(target, COLUMNS, [name for name, _ in MIGRATIONS], PAIR_COLUMNS)
    result = MigrationResult(str(path), store.target, dry_run)
    try:
        _check_source(src, path)
        try:
            store.conn()
        except Exception as exc:  # noqa: BLE001 - psycopg's reasons (refused, auth, no database) read as they are
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"cannot connect to {store.target}: {reason}", param="to") from None
        if not dry_run and not store.conn().execute("SELECT pg_try_advisory_lock(%s)", (MIGRATE_LOCK,)).fetchone()[0]:
            raise ConfigError(f"another `localroute log migrate` is copying into {store.target}: run one at a "
                              "time (feedback and shadow pairs have no unique key, so two would copy them twice)",
                              param="to")
        fresh = _check_target(store)
        if fresh and not dry_run:
            result.applied = store.migrate()
        for table in TABLES:
            result.tables[table.name] = _copy(src, store, table, fresh, dry_run, batch_size, progress)
    finally:
        src.close()
        store.close()
    return result


def _source_path(source: str | Path) -> Path:
    text = str(source)
    if is_postgres_url(text):
        raise ConfigError("the source must be a SQLite routing log (a path or sqlite:///path); to move a "
                          "PostgreSQL log to another server use pg_dump and pg_restore", param="from")
    path = Path(text.removeprefix("sqlite:///"))
    if not path.is_file():
        raise ConfigError(f"routing log not found: {path}", param="from")
    return path


def _names() -> list[str]:
    return [name for name, _ in MIGRATIONS]


def _check_source(src: sqlite3.Connection, path: Path) -> None:
    try:
        done = {r[0] for r in src.execute("SELECT name FROM _migrations")}
    except sqlite3.DatabaseError as exc:  # no such table, or not a SQLite file at all
        raise ConfigError(f"{path} is not a localroute routing log ({exc})", param="from") from None
    newer = sorted(done - set(_names()))
    if newer:
        raise ConfigError(f"{path} was written by a newer localroute (migration {', '.join(newer)} unknown to "
                          "this one): migrate it with that version", param="from")


def _check_target(store: PostgresLogStore) -> bool:
    """True for an empty target (no `_migrations`); refuses one at other migrations than ours."""
    conn = store.conn()
    if not _has_table(store, "_migrations"):
        if _has_table(store, "requests"):
            raise ConfigError(f"{store.target} has a requests table but no _migrations: not a localroute "
                              "routing log", param="to")
        return True
    done = [r[0] for r in conn.execute("SELECT name FROM _migrations").fetchall()]
    ours = _names()
    newer = sorted(set(done) - set(ours))
    if newer:
        raise ConfigError(f"{store.target} is at a newer schema than this localroute (migration "
                          f"{', '.join(newer)} unknown to it): run the migration with that localroute",
                          param="to")
    missing = [n for n in ours if n not in done]
    if missing:
        raise ConfigError(f"{store.target} is at an older schema (migration {', '.join(missing)} not applied): "
                          "upgrade the replicas using it (a `localroute serve` of this version migrates it on "
                          "start-up), then run this again", param="to")
    return False


def _has_table(store: PostgresLogStore, name: str) -> bool:
    return store.conn().execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None


def _source_columns(src: sqlite3.Connection, table: _Table) -> list[str]:
    return [r[1] for r in src.execute(f"PRAGMA table_info({table.name})")
            if not (table.own_id and r[1] == "id")]


def _copy(src: sqlite3.Connection, store: PostgresLogStore, table: _Table, fresh: bool, dry_run: bool,
          batch_size: int, progress: Progress | None) -> TableCount:
    count = TableCount()
    columns = _source_columns(src, table)
    if not columns:  # a log older than the table
        return count
    if not fresh or not dry_run:
        target_columns = set(_target_columns(store, table.name))
        columns = [c for c in columns if c in target_columns]
    count.source = int(src.execute(f"SELECT COUNT(*) FROM {table.name}").fetchone()[0])
    key_at = [columns.index(k) for k in table.key]
    ts_at = columns.index("ts")
    insert = (f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
              "ON CONFLICT DO NOTHING")
    after, read = 0, 0
    while True:  # by rowid: stable while a server still appends to the file
        rows = src.execute(f"SELECT rowid, {', '.join(columns)} FROM {table.name} WHERE rowid > ? "
                           f"ORDER BY rowid LIMIT ?", (after, batch_size)).fetchall()
        if not rows:
            break
        after, batch = rows[-1][0], [clean_row(r[1:]) for r in rows]
        read += len(batch)
        present = set() if fresh else _present(store, table, [tuple(r[i] for i in key_at) for r in batch])
        new = [r for r in batch if tuple(r[i] for i in key_at) not in present]
        count.present += len(batch) - len(new)
        if new and not dry_run:
            store.ensure_partitions(r[ts_at] for r in new)
            conn = store.conn()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(insert, new)
        count.copied += len(new)
        if progress is not None:
            progress(table.name, read, max(count.source, read))
    return count


def _target_columns(store: PostgresLogStore, name: str) -> list[str]:
    rows = store.conn().execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                                "AND table_schema = current_schema()", (name,)).fetchall()
    return [r[0] for r in rows]


def _present(store: PostgresLogStore, table: _Table, keys: Sequence[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """The keys of `keys` already in the target's table."""
    first = sorted({k[0] for k in keys})
    rows = store.conn().execute(f"SELECT {', '.join(table.key)} FROM {table.name} WHERE {table.key[0]} = ANY(%s)",
                                (first,)).fetchall()
    return {tuple(r) for r in rows}
