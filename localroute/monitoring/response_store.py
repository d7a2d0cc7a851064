"""Responses API objects stored in the routing log's database (table `responses`, migrations
`006_stored_responses` and `009_responses_by_day`), on the log's engine: the SQLite file, or
PostgreSQL with `routing_log_url`, where every replica reads what any replica stored. A row is the
Response a client can fetch again (`GET /v1/responses/{id}`) and the chat messages of its
conversation, which `previous_response_id` continues. They hold the conversation's text: a client
that must not have it kept sends `store: false`. They are kept for the routing log's retention
(`routing_log_retention_days`): in SQLite deleted as new ones are stored, in PostgreSQL dropped with
the log's day partitions.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from localroute.errors import BackendUnavailableError
from localroute.monitoring.routing_log import LogStore, open_store

__all__ = ["ResponseStore"]

T = TypeVar("T")


class ResponseStore:
    """`target`: a SQLite path or a postgresql:// URL. One connection, used under a lock, migrated
    on first use and reconnected after an error (the routing log's writer thread keeps its own).
    A PostgreSQL connection that worked before and fails now (the server restarted, an idle link
    closed) is replaced once at once: both calls are idempotent, so a database that is back up is
    not answered as one that is down. Calls run in worker threads (asyncio.to_thread): with
    PostgreSQL, one waits at most `wait_s` for the connection (a call stuck on an unresponsive
    server holds it) and is then a 503, so a stuck database does not take every worker thread of
    the event loop's executor with it."""

    def __init__(self, target: str | Path, retention_days: float | None = None, wait_s: float = 5.0) -> None:
        self.retention_days = retention_days
        self.wait_s = wait_s
        self._store: LogStore = open_store(target)
        self._lock = threading.Lock()
        self._migrated = False
        self._connected = False  # the current connection has completed a call

    def _run(self, fn: Callable[[LogStore], T]) -> T:
        store = self._store
        if not self._lock.acquire(timeout=self.wait_s if store.engine == "postgresql" else -1):
            raise BackendUnavailableError("response store database busy (a call to it has not returned)",
                                          code="routing_log_unavailable", retry_after_s=5.0)
        try:
            while True:
                try:
                    if not self._migrated:
                        store.migrate()
                        self._migrated = True
                    result = fn(store)
                    self._connected = True
                    return result
                except sqlite3.Error:
                    raise
                except Exception as exc:  # PostgreSQL unreachable: a clean 503, retry later
                    store.reset()
                    stale, self._connected = self._connected, False
                    if store.engine != "postgresql":
                        raise
                    if stale:  # a connection that had worked: once more on a new one
                        continue
                    logging.getLogger(__name__).warning("response store %s unavailable: %s", store.target,
                                                        type(exc).__name__)
                    raise BackendUnavailableError(f"response store database unavailable ({type(exc).__name__})",
                                                  code="routing_log_unavailable", retry_after_s=5.0) from None
        finally:
            self._lock.release()

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        ts, body, history = time.time(), json.dumps(response), json.dumps(messages)
        self._run(lambda s: s.put_response(response_id, ts, body, history, self.retention_days))

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        if "\x00" in response_id:  # no stored id holds NUL (PostgreSQL text cannot): not a database error
            return None
        row = self._run(lambda s: s.get_response(response_id))
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def close(self) -> None:
        """Close the connection; one still held by a call stuck on the database is left to the
        process's exit after `wait_s` (shutdown does not hang on it)."""
        if not self._lock.acquire(timeout=self.wait_s if self._store.engine == "postgresql" else -1):
            logging.getLogger(__name__).warning("response store %s: a call has not returned; not closed",
                                                self._store.target)
            return
        try:
            self._store.close()
        finally:
            self._lock.release()
