"""Stored Responses on PostgreSQL (issue 20): two apps built by create_app on one real database
(tests/services.py), each with its own local SQLite path as a replica on its own disk would have,
the official openai client against each. A response stored by replica A is fetched and continued
on replica B and the other way round, streamed or not; `store: false` stores nothing; the rows are
in PostgreSQL, none in either replica's SQLite file; with the database down a lookup is a clean
503 in the OpenAI error shape, and it works again once the database is back; an answer it could not
store is returned all the same, marked unstored."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.routing.base import Tier
from localroute.server import create_app
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream
from tests.services import PostgresServer, postgres_server

KEY = "sk-local-test"
TEXT = "The frontier answers: Paris."


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def _fresh_db(pg: PostgresServer, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def _replica(name: str, url: str, upstream: FaultUpstream, tmp_path: Path) -> Any:
    """An app on the shared database, with its own SQLite path and spill file (which must stay unused)."""
    local = ScriptedBackend("local", text="Local answer here", logprobs=-0.05)
    frontier = OpenAIHTTPBackend("frontier", upstream.url, "frontier-model", api_key="sk-upstream")
    settings = local_settings(api_keys=KEY, routing_log_url=url, routing_log_path=tmp_path / f"{name}.db",
                              routing_log_spill_path=tmp_path / f"{name}-spill.jsonl", routing_log_batch_s=0.01)
    return create_app(settings, tiers=[Tier("local", local, -1.0), Tier("frontier", frontier)])


@pytest.fixture
def replicas(pg: PostgresServer, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[tuple[OpenAI, OpenAI, FaultUpstream, str]]:
    url = _fresh_db(pg, f"responses_{request.node.name[5:40]}")  # one database per test
    with ExitStack() as stack:
        upstream = stack.enter_context(FaultUpstream(Fault(text=TEXT)))
        url_a = stack.enter_context(serve_app(_replica("a", url, upstream, tmp_path)))
        url_b = stack.enter_context(serve_app(_replica("b", url, upstream, tmp_path)))
        yield (OpenAI(base_url=url_a, api_key=KEY, max_retries=0), OpenAI(base_url=url_b, api_key=KEY, max_retries=0),
               upstream, url)


def _stored(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT response_id FROM responses ORDER BY ts").fetchall()]


def test_a_response_stored_on_one_replica_is_continued_and_fetched_on_the_other(
        replicas: tuple[OpenAI, OpenAI, FaultUpstream, str], tmp_path: Path) -> None:
    a, b, upstream, url = replicas
    first = a.responses.create(model="frontier", instructions="Only once.", input="My name is Ada.", store=True)
    assert getattr(first, "store", None) is True and first.output_text == TEXT  # an extra field here

    fetched = b.responses.retrieve(first.id)  # GET /v1/responses/{id} on the other replica
    assert fetched.id == first.id and fetched.output_text == TEXT and fetched.instructions == "Only once."

    second = b.responses.create(model="frontier", previous_response_id=first.id, input="My name?")
    assert second.previous_response_id == first.id
    assert upstream.requests[-1]["json"]["messages"] == [  # A's conversation, continued by B
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": TEXT},
        {"role": "user", "content": "My name?"}]

    # and back: B's streamed answer, stored by B, continued and fetched on A
    events = list(b.responses.create(model="frontier", previous_response_id=second.id, input="Again?", stream=True))
    third_id = events[-1].response.id  # type: ignore[union-attr]
    assert a.responses.retrieve(third_id).output_text == TEXT
    a.responses.create(model="frontier", previous_response_id=third_id, input="Last.")
    assert len(upstream.requests[-1]["json"]["messages"]) == 7

    unstored = a.responses.create(model="frontier", input="x", store=False)
    assert getattr(unstored, "store", None) is False
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        b.responses.create(model="frontier", previous_response_id="resp_missing", input="x")
    assert err.value.code == "previous_response_not_found"

    stored = _stored(url)
    assert first.id in stored and second.id in stored and third_id in stored and unstored.id not in stored
    assert len(stored) == 4
    for name in ("a", "b"):  # the local SQLite paths are not the store (nor the log) with routing_log_url
        assert not (tmp_path / f"{name}.db").exists()


def test_with_the_database_down_a_lookup_is_a_clean_503_and_recovers(
        replicas: tuple[OpenAI, OpenAI, FaultUpstream, str], pg: PostgresServer) -> None:
    a, b, _, _ = replicas
    first = a.responses.create(model="frontier", input="Remember this.")
    assert b.responses.retrieve(first.id).id == first.id  # B's connection is open
    pg.stop()
    try:
        calls: list[Callable[[], object]] = [
            lambda: b.responses.retrieve(first.id),
            lambda: b.responses.create(model="frontier", previous_response_id=first.id, input="x")]
        for call in calls:
            with pytest.raises(openai.APIStatusError) as err:
                call()
            assert err.value.status_code == 503 and err.value.code == "routing_log_unavailable"
            assert err.value.response.headers.get("retry-after") == "5"
    finally:
        pg.start()
    assert b.responses.retrieve(first.id).output_text == TEXT  # reconnected


def test_with_the_database_down_an_answer_is_returned_unstored_not_a_503(
        replicas: tuple[OpenAI, OpenAI, FaultUpstream, str], pg: PostgresServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """The store failing after the answer was computed (and paid for): the client gets the answer,
    marked `store: false` with the reason in x-localroute-store-error (never claimed stored: it is
    not retrievable once the database is back), a log line without the prompt, a /metrics count."""
    import httpx

    a, _, upstream, _ = replicas
    assert a.responses.create(model="frontier", input="Warm up.").id  # A's store connection is open
    base, auth = str(a.base_url).rstrip("/"), {"Authorization": f"Bearer {KEY}"}
    pg.stop()
    try:
        r = httpx.post(f"{base}/responses", headers=auth, timeout=60,
                       json={"model": "frontier", "input": "Secret plan XYZZY.", "store": True})
        metrics = httpx.get(f"{base.removesuffix('/v1')}/metrics", headers=auth).text
    finally:
        pg.start()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["store"] is False and body["output"][0]["content"][0]["text"] == TEXT
    assert r.headers["x-localroute-store-error"] == "routing_log_unavailable"
    assert 'localroute_response_store_failures_total{reason="routing_log_unavailable"} 1.0' in metrics
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "localroute.monitoring.response_store"]
    assert warnings == [f"response {body['id']} not stored (routing_log_unavailable): answered with store false"]
    assert all("XYZZY" not in rec.getMessage() for rec in caplog.records)
    assert len(upstream.requests) == 2  # answered once, not retried
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(body["id"])  # database back: the answer was indeed not stored


def test_after_a_database_restart_the_first_calls_reconnect(
        replicas: tuple[OpenAI, OpenAI, FaultUpstream, str], pg: PostgresServer) -> None:
    """A restart (or anything else that closes the server's side) leaves each replica a dead
    connection it does not know about yet: the first lookup and the first store on it reconnect
    once and succeed, instead of a 503 for a database that is up."""
    a, b, _, _ = replicas
    first = a.responses.create(model="frontier", input="Remember this.")
    assert b.responses.retrieve(first.id).id == first.id  # both replicas' connections are open
    pg.stop()
    pg.start()
    assert b.responses.retrieve(first.id).output_text == TEXT  # B's lookup on its dead connection
    second = a.responses.create(model="frontier", previous_response_id=first.id, input="Again?")  # A's
    assert b.responses.retrieve(second.id).previous_response_id == first.id


def test_a_nul_in_a_response_id_is_not_found_not_a_503(replicas: tuple[OpenAI, OpenAI, FaultUpstream, str]) -> None:
    """PostgreSQL text cannot hold NUL: such an id names no stored response (a 404, a 400 as
    previous_response_id), not a database outage, and the store's connection is kept."""
    import httpx

    a, b, _, _ = replicas
    first = a.responses.create(model="frontier", input="Remember this.")
    base, auth = str(b.base_url).rstrip("/"), {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{base}/responses/resp_%00x", headers=auth)
    assert r.status_code == 404, r.text
    r = httpx.post(f"{base}/responses", headers=auth,
                   json={"model": "frontier", "input": "x", "previous_response_id": "resp_\x00x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found", r.text
    assert b.responses.retrieve(first.id).id == first.id


def test_shutdown_closes_every_database_session(pg: PostgresServer, tmp_path: Path) -> None:
    """The app's stores (routing log writer, feedback, stored Responses) each hold a connection:
    once the app has shut down, none of them is left open on the server."""
    import httpx
    import psycopg

    url = _fresh_db(pg, "responses_shutdown")
    db = url.rsplit("/", 1)[1]

    def sessions() -> int:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            row = conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                               (db,)).fetchone()
            return int(row[0]) if row is not None else 0

    with FaultUpstream(Fault(text=TEXT)) as upstream, serve_app(_replica("a", url, upstream, tmp_path)) as base:
        client = OpenAI(base_url=base, api_key=KEY, max_retries=0)
        first = client.responses.create(model="frontier", input="Remember this.")
        assert client.responses.retrieve(first.id).id == first.id
        r = httpx.post(f"{base}/feedback", headers={"Authorization": f"Bearer {KEY}"},
                       json={"request_id": "chatcmpl-" + first.id.removeprefix("resp_"), "score": 1.0})
        assert r.status_code == 200, r.text
        assert sessions() >= 2  # the writer's, feedback's, the response store's
    deadline = time.monotonic() + 5
    while sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == 0


def test_a_stuck_database_call_does_not_hold_the_other_callers(
        replicas: tuple[OpenAI, OpenAI, FaultUpstream, str]) -> None:
    """The database's sessions frozen (SIGSTOP: the server still holds the TCP connection but
    answers nothing): the call on the connection waits, and the calls queued behind it are a 503
    within the store's wait (5 s) instead of each holding one of the event loop's few worker
    threads for as long as the database stays stuck. Once it answers again, the stuck call succeeds."""
    import os
    import signal
    import threading

    import httpx
    import psycopg

    a, b, _, url = replicas
    first = a.responses.create(model="frontier", input="Remember this.")
    assert b.responses.retrieve(first.id).id == first.id  # B's connection is open
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                           (url.rsplit("/", 1)[1],)).fetchall()]
    assert pids
    base, auth = str(b.base_url).rstrip("/"), {"Authorization": f"Bearer {KEY}"}
    results: dict[int, tuple[object, float]] = {}

    def get(i: int) -> None:
        started = time.monotonic()
        try:
            status: object = httpx.get(f"{base}/responses/{first.id}", headers=auth, timeout=60).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        results[i] = (status, time.monotonic() - started)

    threads = [threading.Thread(target=get, args=(i,), daemon=True) for i in range(3)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        threads[0].start()
        time.sleep(0.5)  # the first holds the connection
        threads[1].start()
        threads[2].start()
        deadline = time.monotonic() + 15
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        queued = dict(results)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert sorted(queued) == [1, 2] and all(s == 503 and d < 10 for s, d in queued.values()), (queued, results)
    assert results[0][0] == 200, results


def test_close_does_not_hang_on_a_call_stuck_on_the_database(pg: PostgresServer) -> None:
    """Shutdown closes the store: with a call stuck on a frozen session, close gives up after the
    store's wait instead of hanging the app's shutdown."""
    import os
    import signal
    import threading

    import psycopg

    from localroute.monitoring.response_store import ResponseStore

    url = _fresh_db(pg, "responses_close_stuck")
    store = ResponseStore(url, wait_s=1.0)
    store.put("resp_1", {"id": "resp_1"}, [])
    with psycopg.connect(pg.url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                           (url.rsplit("/", 1)[1],)).fetchall()]
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGSTOP)
    try:
        stuck = threading.Thread(target=store.get, args=("resp_1",), daemon=True)
        stuck.start()
        time.sleep(0.3)
        started = time.monotonic()
        closer = threading.Thread(target=store.close, daemon=True)
        closer.start()
        closer.join(5)
        assert not closer.is_alive() and time.monotonic() - started < 3
    finally:
        os.kill(pids[0], signal.SIGCONT)
    stuck.join(30)
    store.close()
