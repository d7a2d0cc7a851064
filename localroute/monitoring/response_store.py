"""Responses API objects stored in the routing log's SQLite file (table `responses`, migration
`006_stored_responses`): the Response a client can fetch again (`GET /v1/responses/{id}`) and the
chat messages of its conversation, which `previous_response_id` continues. They hold the
conversation's text: a client that must not have it kept sends `store: false`. They are kept for
the routing log's retention (`routing_log_retention_days`), pruned as new ones are stored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["ResponseStore"]


class ResponseStore:
    """One short-lived connection per call, as the feedback store (the routing log's writer thread
    keeps its own)."""

    def __init__(self, path: Path, retention_days: float | None = None) -> None:
        self.path = Path(path)
        self.retention_days = retention_days

    def _conn(self) -> Any:
        from localroute.monitoring.sqlite_store import connect, migrate

        conn = connect(self.path)
        migrate(conn)
        return conn

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        conn = self._conn()
        now = time.time()
        try:
            conn.execute("INSERT OR REPLACE INTO responses (response_id, ts, response, messages) VALUES (?, ?, ?, ?)",
                         (response_id, now, json.dumps(response), json.dumps(messages)))
            if self.retention_days is not None:
                conn.execute("DELETE FROM responses WHERE ts < ?", (now - self.retention_days * 86400,))
        finally:
            conn.close()

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        conn = self._conn()
        try:
            row = conn.execute("SELECT response, messages FROM responses WHERE response_id = ?",
                               (response_id,)).fetchone()
        finally:
            conn.close()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))
