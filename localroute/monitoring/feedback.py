"""Feedback on answered requests and the human-review sample, stored in the routing log (SQLite
or PostgreSQL, through its store: routing_log.open_store) next to the `requests` rows they refer
to (tables `feedback` and `review_sample`, created by the migration `004_feedback_and_review`).
With PostgreSQL every replica sees every replica's rows, so feedback on an answer from one
replica may be posted to any other.

Feedback comes from a human reviewer or a downstream metric through `POST /v1/feedback`
(`{request_id, score | correct, source}`); `localroute train --from-log` turns (prompt, tier,
feedback) into router training data. A request id must name a logged request: feedback on
nothing would train on nothing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from localroute.errors import BackendUnavailableError, InvalidRequestError

if TYPE_CHECKING:
    from localroute.monitoring.record import RequestRecord
    from localroute.monitoring.routing_log import LogStore

T = TypeVar("T")


class FeedbackRequest(BaseModel):
    """Body of POST /v1/feedback."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200, description="The `id` of the answered completion.")
    score: float | None = Field(None, ge=0.0, le=1.0, description="Quality in [0, 1].")
    correct: bool | None = Field(None, description="Shorthand for score 1 (true) or 0 (false).")
    source: str = Field("human", max_length=100, description="Who judged: human, a metric's name, ...")

    @field_validator("request_id", "source")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:  # PostgreSQL text cannot hold NUL: a client mistake, not a 503
            raise ValueError("must not contain NUL (\\u0000) characters")
        return value

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


class FeedbackStore:
    """Reads and writes the two tables. `target`: a SQLite path or a postgresql:// URL. One
    connection (store_calls.StoreCalls, as the Responses store: under a lock, calls are rare; a
    dead PostgreSQL connection, after a restart, replaced once; a wait for it capped at `wait_s`,
    then a 503)."""

    def __init__(self, target: str | Path, lookup_wait_s: float = 1.0, wait_s: float = 5.0) -> None:
        from localroute.monitoring.store_calls import StoreCalls

        self.target = target
        self.lookup_wait_s = lookup_wait_s
        self._calls = StoreCalls(target, "routing log", wait_s)
        try:  # at start-up: a bad target fails now, not on a request
            self._run(lambda s: None)
        except BackendUnavailableError:  # PostgreSQL down at start-up: serve; migrate on first use
            logging.getLogger(__name__).warning("feedback store %s unavailable at start-up", self._calls.store.target)

    @property
    def engine(self) -> str:
        return self._calls.engine

    def _run(self, fn: Callable[[LogStore], T], retry: bool = True) -> T:
        return self._calls.run(fn, retry)

    def add(self, fb: FeedbackRequest) -> dict[str, Any]:
        """Store `fb`; the request must be logged. Another replica's row may still be in its writer's
        batch: the lookup is retried for up to `lookup_wait_s` before the id counts as unknown."""
        deadline = time.monotonic() + self.lookup_wait_s
        while True:
            row = self._run(lambda s: s.latest_request(fb.request_id))
            if row is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if row is None:
            raise InvalidRequestError(f"no logged request with id {fb.request_id!r}", param="request_id",
                                      code="unknown_request_id")
        ts = time.time()
        correct = None if fb.correct is None else int(fb.correct)
        # not retried on a new connection: the INSERT may have committed before the old one dropped
        # (the lookup above, through the same connection, has just replaced a stale one)
        fid = self._run(lambda s: s.add_feedback(ts, fb.request_id, fb.value, correct, fb.source), retry=False)
        return {"object": "feedback", "id": fid, "request_id": fb.request_id, "score": fb.value,
                "source": fb.source, "policy": row[0], "tier": row[1], "created": int(ts)}

    def mark_review(self, request_id: str, policy: str, tier: str | None) -> None:
        self._run(lambda s: s.mark_review(request_id, time.time(), policy, tier))

    def review_queue(self, pending_only: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        """Requests sampled for review, newest first, with their feedback count."""
        rows = self._run(lambda s: s.review_queue(pending_only, limit))
        return [{"request_id": r[0], "ts": r[1], "policy": r[2], "tier": r[3], "feedback": r[4], "score": r[5]}
                for r in rows]

    def close(self) -> None:
        self._calls.close()


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
        if self.store.engine != "postgresql":
            self.store.mark_review(rec.request_id, rec.policy, tier)
            return
        # a network database: never on the event loop (a server that is down would stall every request)
        threading.Thread(target=self._mark, args=(rec.request_id, rec.policy, tier), daemon=True).start()

    def _mark(self, request_id: str, policy: str, tier: str | None) -> None:
        try:
            self.store.mark_review(request_id, policy, tier)
        except Exception as exc:  # a lost review mark costs one sampled request, never a response
            logging.getLogger(__name__).warning("review mark for %s not stored: %s", request_id, type(exc).__name__)
