"""One routing-log database connection shared by a store's callers (the feedback store, the
Responses store): used under a lock, migrated on first use, reconnected after an error, with the
same answers on both engines. The routing log's writer thread keeps its own connection."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from localroute.errors import BackendUnavailableError, InvalidRequestError
from localroute.monitoring.routing_log import LogStore, open_store

__all__ = ["StoreCalls"]

T = TypeVar("T")


class StoreCalls:
    """`target`: a SQLite path or a postgresql:// URL; `what` names the store in errors and logs.

    A PostgreSQL connection that worked before and fails now (the server restarted, an idle link
    closed) is replaced once at once: the callers' calls are idempotent, so a database that is back
    up is not answered as one that is down. Calls run in worker threads (asyncio.to_thread): with
    PostgreSQL, one waits at most `wait_s` for the connection (a call stuck on an unresponsive
    server holds it) and is then a 503, so a stuck database does not take every worker thread of
    the event loop's executor with it. SQLite errors and a caller's own errors pass through."""

    def __init__(self, target: str | Path, what: str, wait_s: float = 5.0) -> None:
        self.what = what
        self.wait_s = wait_s
        self.store: LogStore = open_store(target)
        self._lock = threading.Lock()
        self._migrated = False
        self._connected = False  # the current connection has completed a call

    @property
    def engine(self) -> str:
        return self.store.engine

    def _acquire(self) -> bool:
        return self._lock.acquire(timeout=self.wait_s if self.engine == "postgresql" else -1)

    def run(self, fn: Callable[[LogStore], T], retry: bool = True) -> T:
        """`retry` False for a call that is not idempotent (an INSERT without a key): a connection
        lost after the server committed would store it twice."""
        store = self.store
        if not self._acquire():
            raise BackendUnavailableError(f"{self.what} database busy (a call to it has not returned)",
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
                except (InvalidRequestError, sqlite3.Error):
                    raise
                except Exception as exc:  # PostgreSQL unreachable: a clean 503, retry later
                    store.reset()
                    stale, self._connected = self._connected, False
                    if store.engine != "postgresql":
                        raise
                    if stale and retry:  # a connection that had worked: once more on a new one
                        continue
                    logging.getLogger(__name__).warning("%s %s unavailable: %s", self.what, store.target,
                                                        type(exc).__name__)
                    raise BackendUnavailableError(f"{self.what} database unavailable ({type(exc).__name__})",
                                                  code="routing_log_unavailable", retry_after_s=5.0) from None
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the connection; one still held by a call stuck on the database is left to the
        process's exit after `wait_s` (shutdown does not hang on it)."""
        if not self._acquire():
            logging.getLogger(__name__).warning("%s %s: a call has not returned; not closed", self.what,
                                                self.store.target)
            return
        try:
            self.store.close()
        finally:
            self._lock.release()
