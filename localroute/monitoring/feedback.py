"""Feedback on answered requests and the human-review sample, stored in the routing log's SQLite
file next to the `requests` rows they refer to (tables `feedback` and `review_sample`, created by
the routing log's migration `004_feedback_and_review`).

Feedback comes from a human reviewer or a downstream metric through `POST /v1/feedback`
(`{request_id, score | correct, source}`); `localroute train --from-log` turns (prompt, tier,
feedback) into router training data. A request id must name a logged request: feedback on
nothing would train on nothing.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from localroute.errors import InvalidRequestError

if TYPE_CHECKING:
    from localroute.monitoring.record import RequestRecord


class FeedbackRequest(BaseModel):
    """Body of POST /v1/feedback."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200, description="The `id` of the answered completion.")
    score: float | None = Field(None, ge=0.0, le=1.0, description="Quality in [0, 1].")
    correct: bool | None = Field(None, description="Shorthand for score 1 (true) or 0 (false).")
    source: str = Field("human", max_length=100, description="Who judged: human, a metric's name, ...")

    @model_validator(mode="after")
    def _one_of(self) -> FeedbackRequest:
        if self.score is None and self.correct is None:
            raise ValueError("give `score` (0..1) or `correct` (true/false)")
        if self.score is not None and self.correct is not None and float(self.correct) != self.score:
            raise ValueError("`score` and `correct` disagree")
        return self

    @property
    def value(self) -> float:
        return float(self.score) if self.score is not None else float(bool(self.correct))


def _connect(path: Path) -> sqlite3.Connection:
    from localroute.monitoring.routing_log import connect, migrate

    conn = connect(path)
    migrate(conn)
    return conn


class FeedbackStore:
    """Reads and writes the two tables; one short-lived connection per call (calls are rare)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _connect(self.path).close()  # migrate at start-up: a bad path fails now, not on a request

    def add(self, fb: FeedbackRequest) -> dict[str, Any]:
        conn = _connect(self.path)
        try:
            row = conn.execute("SELECT policy, tier FROM requests WHERE request_id = ? ORDER BY ts DESC LIMIT 1",
                               (fb.request_id,)).fetchone()
            if row is None:
                raise InvalidRequestError(f"no logged request with id {fb.request_id!r}", param="request_id",
                                          code="unknown_request_id")
            ts = time.time()
            correct = None if fb.correct is None else int(fb.correct)
            cur = conn.execute("INSERT INTO feedback (ts, request_id, score, correct, source) VALUES (?, ?, ?, ?, ?)",
                               (ts, fb.request_id, fb.value, correct, fb.source))
            return {"object": "feedback", "id": cur.lastrowid, "request_id": fb.request_id, "score": fb.value,
                    "source": fb.source, "policy": row[0], "tier": row[1], "created": int(ts)}
        finally:
            conn.close()

    def mark_review(self, request_id: str, policy: str, tier: str | None) -> None:
        conn = _connect(self.path)
        try:
            conn.execute("INSERT OR IGNORE INTO review_sample (request_id, ts, policy, tier) VALUES (?, ?, ?, ?)",
                         (request_id, time.time(), policy, tier))
        finally:
            conn.close()

    def review_queue(self, pending_only: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        """Requests sampled for review, newest first, with their feedback count."""
        conn = _connect(self.path)
        try:
            sql = ("SELECT s.request_id, s.ts, s.policy, s.tier, COUNT(f.id), AVG(f.score) FROM review_sample s "
                   "LEFT JOIN feedback f ON f.request_id = s.request_id GROUP BY s.request_id "
                   + ("HAVING COUNT(f.id) = 0 " if pending_only else "") + "ORDER BY s.ts DESC LIMIT ?")
            return [{"request_id": r[0], "ts": r[1], "policy": r[2], "tier": r[3], "feedback": r[4], "score": r[5]}
                    for r in conn.execute(sql, (limit,))]
        finally:
            conn.close()


class ReviewSampler:
    """Observer that marks a random `rate` share of successful requests for human review."""

    def __init__(self, store: FeedbackStore, rate: float, seed: int | None = None) -> None:
        self.store = store
        self.rate = rate
        self._rng = random.Random(seed)

    def __call__(self, rec: RequestRecord) -> None:
        if rec.status_code != 200 or self.rate <= 0 or self._rng.random() >= self.rate:
            return
        tier = rec.decision.answered_by if rec.decision is not None else None
        self.store.mark_review(rec.request_id, rec.policy, tier)
