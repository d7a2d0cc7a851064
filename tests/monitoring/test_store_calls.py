"""The connection the feedback store and the Responses store share the handling of (issue 20), on
a real throwaway PostgreSQL (tests/services.py) that is restarted or frozen under them: after a
restart the first call on the dead connection reconnects once and succeeds (no 503 for a database
that is up), and a call queued behind one stuck on a frozen session is a 503 within `wait_s`; a
feedback INSERT whose connection drops after the server ran it is not run again on a new one.
The Responses store through the server: tests/server/responses/test_store_postgres.py."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psycopg
import pytest

from localroute.errors import BackendUnavailableError
from localroute.monitoring.feedback import FeedbackRequest, FeedbackStore
from localroute.monitoring.routing_log import RoutingLog
from tests.monitoring.test_postgres_log import _fresh_db, _record
from tests.services import PostgresServer, postgres_server


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def _logged(pg: PostgresServer, name: str, tmp_path: Path, n: int = 3) -> str:
    url = _fresh_db(pg, name)
    log = RoutingLog(url, spill_path=tmp_path / "spill.jsonl", batch_s=0.01)
    for i in range(n):
        log.observe(_record(i))
    log.close()
    return url


def _session_pids(pg: PostgresServer, url: str) -> list[int]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                           (url.rsplit("/", 1)[1],)).fetchall()]


def test_feedback_after_a_database_restart_reconnects_instead_of_a_503(pg: PostgresServer, tmp_path: Path) -> None:
    """Each of the store's calls (add: lookup + insert, review marks, the review queue) on the
    connection a restart left dead."""
    url = _logged(pg, "calls_restart", tmp_path)
    fb = FeedbackStore(url, lookup_wait_s=0.1)
    assert fb.add(FeedbackRequest(request_id="chatcmpl-0", score=1.0))["score"] == 1.0  # connection open
    def restarted() -> None:
        pg.stop()
        pg.start()

    restarted()
    assert fb.add(FeedbackRequest(request_id="chatcmpl-1", correct=False))["score"] == 0.0
    restarted()
    fb.mark_review("chatcmpl-2", "localroute/cascade", "local")
    restarted()
    assert [r["request_id"] for r in fb.review_queue(pending_only=False)] == ["chatcmpl-2"]
    with pytest.raises(Exception, match="no logged request"):  # a client mistake stays a 400 after one
        restarted()
        fb.add(FeedbackRequest(request_id="nope", score=0.5))
    fb.close()


def test_feedback_with_the_database_down_is_still_a_clean_503(pg: PostgresServer, tmp_path: Path) -> None:
    """Reconnecting once does not turn a database that is down into a hang or a 500."""
    url = _logged(pg, "calls_down", tmp_path)
    fb = FeedbackStore(url, lookup_wait_s=0.1)
    fb.mark_review("chatcmpl-0", "localroute/cascade", None)
    pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            fb.add(FeedbackRequest(request_id="chatcmpl-0", score=1.0))
        assert info.value.status_code == 503 and info.value.code == "routing_log_unavailable"
        assert time.monotonic() - started < 10
    finally:
        pg.start()
    assert fb.add(FeedbackRequest(request_id="chatcmpl-0", score=1.0))["score"] == 1.0
    fb.close()


def test_a_feedback_call_queued_behind_a_stuck_one_is_a_503_within_the_wait(
        pg: PostgresServer, tmp_path: Path) -> None:
    """The session frozen (SIGSTOP): the first call waits on it; the next is a 503 after `wait_s`
    instead of holding a worker thread for as long as the database stays stuck."""
    url = _logged(pg, "calls_stuck", tmp_path)
    fb = FeedbackStore(url, lookup_wait_s=0.1, wait_s=1.0)
    fb.review_queue()
    pids = _session_pids(pg, url)
    assert len(pids) == 1
    results: dict[str, object] = {}

    def first() -> None:
        results["first"] = len(fb.review_queue())

    stuck = threading.Thread(target=first, daemon=True)
    os.kill(pids[0], signal.SIGSTOP)
    try:
        stuck.start()
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            fb.mark_review("chatcmpl-1", "localroute/cascade", None)
        waited = time.monotonic() - started
    finally:
        os.kill(pids[0], signal.SIGCONT)
    stuck.join(30)
    assert info.value.status_code == 503 and 0.8 < waited < 3, waited
    assert results == {"first": 0}
    fb.close()


class _CuttingProxy:
    """TCP on 127.0.0.1 between the store and the PostgreSQL server that can cut one connection at
    a statement: a client message holding `cut_at` reaches the server (which runs it, and with
    autocommit commits it), then, instead of its reply, the client gets its connection closed, as
    when the link drops between the server's commit and its answer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_at: bytes | None = None
        self.cuts = 0
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, direct_url: str) -> str:
        return direct_url.replace(f":{self.upstream_port}/", f":{self.port}/") + "?sslmode=disable"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.connections += 1
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                if self.cut_at is not None and self.cut_at in data:
                    self.cut_at = None
                    cut.set()  # before it is sent: whatever the server answers now is dropped
                server.sendall(data)
        self._drop(client, server)

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        with suppress(OSError):
            while data := server.recv(65536):
                if cut.is_set():  # the reply to the statement cut at (the server has committed it)
                    self.cuts += 1
                    break
                client.sendall(data)
        self._drop(client, server)

    @staticmethod
    def _drop(*socks: socket.socket) -> None:
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _feedback_rows(url: str, request_id: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM feedback WHERE request_id = %s", (request_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_feedback_insert_whose_connection_drops_is_not_run_again(pg: PostgresServer, tmp_path: Path) -> None:
    """The lookup of a feedback's request, idempotent, is run again on a new connection when its own
    drops. The INSERT after it reaches the server, which commits it, and its connection drops before
    the answer comes back: a 503, not a second try on a new connection (the row stored twice)."""
    url = _logged(pg, "calls_cut", tmp_path)
    proxy = _CuttingProxy(pg.port)
    fb = FeedbackStore(proxy.url(url), lookup_wait_s=0.1)  # its first connection, migrated: it has worked
    try:
        proxy.cut_at = b"SELECT policy, tier FROM requests"
        assert fb.add(FeedbackRequest(request_id="chatcmpl-1", score=0.5))["score"] == 0.5
        assert (proxy.cuts, proxy.connections) == (1, 2)  # the lookup again, on a new connection
        assert _feedback_rows(url, "chatcmpl-1") == 1

        proxy.cut_at = b"INSERT INTO feedback"
        with pytest.raises(BackendUnavailableError) as info:
            fb.add(FeedbackRequest(request_id="chatcmpl-0", score=1.0))
        assert info.value.status_code == 503 and info.value.code == "routing_log_unavailable"
        assert (proxy.cuts, proxy.connections) == (2, 2)  # no new connection for a second INSERT
        assert _feedback_rows(url, "chatcmpl-0") == 1  # the server did commit it, once
    finally:
        fb.close()
        proxy.close()
