"""The Responses API's store in the routing log's SQLite file: put, get, and the routing log's
retention (PostgreSQL: tests/monitoring/test_postgres_log.py, tests/server/responses/test_store_postgres.py)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from localroute.monitoring.response_store import ResponseStore
from localroute.monitoring.routing_log import RoutingLog


def test_put_get_and_retention(tmp_path: Path) -> None:
    path = tmp_path / "routing.db"
    store = ResponseStore(path, retention_days=1)
    store.put("resp_old", {"id": "resp_old"}, [{"role": "user", "content": "hi"}])
    with sqlite3.connect(path) as conn:  # age it past the retention
        conn.execute("UPDATE responses SET ts = ? WHERE response_id = 'resp_old'", (time.time() - 2 * 86400,))
    assert store.get("resp_old") == ({"id": "resp_old"}, [{"role": "user", "content": "hi"}])
    store.put("resp_new", {"id": "resp_new", "output": ["é"]}, [])
    assert store.get("resp_old") is None
    assert store.get("resp_new") == ({"id": "resp_new", "output": ["é"]}, [])
    assert store.get("resp_missing") is None
    assert ResponseStore(path).get("resp_new") is not None  # the same table, from any store on the file


def test_the_routing_logs_retention_prunes_stored_responses_too(tmp_path: Path) -> None:
    """Retention as the rest of the log: the writer's prune (start-up, hourly) drops expired
    responses even when no new one is stored."""
    path = tmp_path / "routing.db"
    store = ResponseStore(path, retention_days=1)
    store.put("resp_old", {"id": "resp_old"}, [])
    store.put("resp_kept", {"id": "resp_kept"}, [])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE responses SET ts = ? WHERE response_id = 'resp_old'", (time.time() - 2 * 86400,))
    RoutingLog(path, retention_days=1).close()
    assert store.get("resp_old") is None and store.get("resp_kept") is not None
    store.close()
