"""Responses API objects stored in the routing log's database (table `responses`, migrations
`006_stored_responses` and `009_responses_by_day`), on the log's engine: the SQLite file, or
PostgreSQL with `routing_log_url`, where every replica reads what any replica stored. A row is the
Response a client can fetch again (`GET /v1/responses/{id}`) and the chat messages of its
conversation, which `previous_response_id` continues. They hold the conversation's text: a client
that must not have it kept sends `store: false`. They are kept for the routing log's retention
(`routing_log_retention_days`): in SQLite deleted as new ones are stored, in PostgreSQL dropped with
the log's day partitions.

A store that fails after an answer was computed (and paid for) does not cost the client the answer:
the serving path returns it with `"store": false` and the failure's reason (`failed`): logged
without any of the conversation's text, and counted (`on_failure`, the app's /metrics counter
`localroute_response_store_failures_total`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localroute.errors import LocalrouteError
from localroute.monitoring.store_calls import StoreCalls

__all__ = ["STORE_ERROR_HEADER", "ResponseStore"]

log = logging.getLogger(__name__)

# on an answer returned unstored: why (an error code, or the exception's type name)
STORE_ERROR_HEADER = "x-localroute-store-error"


class ResponseStore:
    """`target`: a SQLite path or a postgresql:// URL. One connection (store_calls.StoreCalls:
    under a lock, migrated on first use, a dead PostgreSQL connection replaced once, a wait for it
    capped at `wait_s`, then a 503); the routing log's writer thread keeps its own."""

    def __init__(self, target: str | Path, retention_days: float | None = None, wait_s: float = 5.0,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.retention_days = retention_days
        self.on_failure = on_failure
        self._calls = StoreCalls(target, "response store", wait_s)

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        ts, body, history = time.time(), json.dumps(response), json.dumps(messages)
        self._calls.run(lambda s: s.put_response(response_id, ts, body, history, self.retention_days))

    def failed(self, response_id: str, exc: BaseException) -> str:
        """A `put` of an answer already computed failed: log it (no text) and count it; returns the
        reason for STORE_ERROR_HEADER."""
        reason = (exc.code or exc.error_type) if isinstance(exc, LocalrouteError) else type(exc).__name__
        log.warning("response %s not stored (%s): answered with store false", response_id, reason)
        if self.on_failure is not None:
            self.on_failure(reason)
        return reason

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        if "\x00" in response_id:  # no stored id holds NUL (PostgreSQL text cannot): not a database error
            return None
        row = self._calls.run(lambda s: s.get_response(response_id))
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def close(self) -> None:
        """Close the connection (not waiting past `wait_s` on a call stuck on the database)."""
        self._calls.close()
