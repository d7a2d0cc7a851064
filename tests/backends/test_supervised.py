"""The engine in a supervised child process (backends/supervised.py): the same answers as in-process,
and a native crash (SIGKILL, SIGSEGV) under load is a tier that is down for a moment, never a dead
server: every request gets an answer or a clean error within its deadline, and the tier comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from localroute.backends.base import load_backend
from localroute.backends.engine_cpu import process_cpu_s
from localroute.backends.engine_wire import _rebuild, _spec
from localroute.backends.supervised import SupervisedBackend, supervised
from localroute.errors import (
    BackendUnavailableError,
    ContextLengthExceededError,
    EngineDeadError,
    LocalrouteError,
    RateLimitError,
)
from localroute.server.app import create_app
from localroute.settings import TierSettings
from localroute.types import GenerationRequest, SamplingParams
from tests.conftest import local_settings, serve_app
from tests.fault_upstream import fault_upstream

pytestmark = pytest.mark.slow

SMOL = {"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}
QUESTION = [{"role": "user", "content": "Name three colours."}]


def _request(max_tokens: int = 24, **params: Any) -> GenerationRequest:
    return GenerationRequest(messages=tuple(QUESTION), params=SamplingParams(
        max_tokens=max_tokens, temperature=0.0, top_logprobs=2, **params), request_id="t")


def test_errors_cross_the_pipe_as_their_own_class() -> None:
    for exc in (ContextLengthExceededError("too long", param="messages"), RateLimitError("full", retry_after_s=1.0),
                EngineDeadError("gone"), BackendUnavailableError("busy", code="custom_code")):
        back = _rebuild(_spec(exc))
        assert type(back) is type(exc)
        assert (back.message, back.param, back.code, back.retry_after_s) == (
            exc.message, exc.param, exc.code, exc.retry_after_s)
    other = _rebuild(_spec(ValueError("boom")))  # anything else is the engine's failure of one request
    assert type(other) is BackendUnavailableError and "ValueError: boom" in other.message


def test_only_native_in_process_engines_are_isolated() -> None:
    settings = local_settings()
    calls: list[str] = []

    def load(tier: TierSettings, _: Any) -> Any:
        calls.append(tier.kind)
        return "in-process"

    remote = TierSettings(name="f", kind="openai", model="m", base_url="http://127.0.0.1:1/v1")
    assert supervised(remote, settings, load) == "in-process"
    threaded = local_settings(engine_isolation="thread")
    assert supervised(TierSettings(**SMOL), threaded, load) == "in-process"
    assert calls == ["openai", "llama_cpp"]


def test_same_tokens_and_logprobs_as_in_process() -> None:
    settings = local_settings()
    tier = TierSettings(**SMOL)
    inner = load_backend(tier, settings)
    outer = SupervisedBackend(tier, settings)

    async def run() -> tuple[Any, Any, list[Any]]:
        try:
            a = await inner.generate(_request())
            b = await outer.generate(_request())
            deltas = [d async for d in outer.stream(_request())]
            return a, b, deltas
        finally:
            await inner.aclose()
            await outer.aclose()

    a, b, deltas = asyncio.run(run())
    assert b.completion_tokens > 0
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    assert [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]  # bit-identical: same engine
    assert [t.top_logprobs for t in a.tokens] == [t.top_logprobs for t in b.tokens]
    assert b.tokens == a.tokens and (b.text, b.finish_reason, b.extra) == (a.text, a.finish_reason, a.extra)
    assert deltas[-1].final is not None and deltas[-1].final.text == a.text
    assert deltas[-1].final.tokens == a.tokens  # rebuilt from the pipe's tuples, field for field
    assert [d.token for d in deltas if d.token is not None] == a.tokens
    assert "".join(d.text for d in deltas) == a.text
    assert outer.fingerprint()["model_file"] == Path(inner.engine.model_path).name


def test_a_request_error_in_the_engine_is_that_requests_error_only() -> None:
    settings = local_settings(n_ctx=256)
    backend = SupervisedBackend(TierSettings(**SMOL), settings)

    async def run() -> Any:
        try:
            long = GenerationRequest(messages=({"role": "user", "content": "word " * 400},),
                                     params=SamplingParams(max_tokens=8), request_id="long")
            with pytest.raises(ContextLengthExceededError):
                await backend.generate(long)
            return await backend.generate(_request(max_tokens=4))
        finally:
            await backend.aclose()

    gen = asyncio.run(run())
    assert gen.completion_tokens > 0 and backend.crashes == 0


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _metric(text: str, name: str, tier: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{tier="{tier}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _one(client: httpx.AsyncClient, i: int, stream: bool) -> tuple[str, Any]:
    """('ok', tier, degraded) | ('error', status, code) | ('stream-error', code) for one request."""
    body = {"model": "localroute/cascade", "messages": [{"role": "user", "content": f"Count to {20 + i}."}],
            "max_tokens": 48, "temperature": 0, "stream": stream}
    if not stream:
        r = await client.post("/chat/completions", json=body)
        if r.status_code != 200:
            print(f"request {i}: {r.status_code} {r.json()['error']}")  # shown when a test fails
            return "error", (r.status_code, r.json()["error"]["code"])
        info = r.json()["localroute"]
        return "ok", (info["tier"], info["degraded"])
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            print(f"request {i} (stream): {r.status_code} {r.text}")
            return "error", (r.status_code, json.loads(r.text)["error"]["code"])
        last: dict[str, Any] = {}
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = json.loads(line[6:])
        if "error" in last:
            return "stream-error", last["error"]["code"]
        return "ok", (last["localroute"]["tier"], last["localroute"]["degraded"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_engine_crash_under_load_is_survived(sig: signal.Signals, tmp_path: Path) -> None:
    """Kill the engine process while 8 requests (half streamed) run: each ends within its deadline,
    answered by the frontier (flagged degraded) or by the local tier if it finished first; /health
    shows the tier down, /metrics counts the restart, and the tier answers again afterwards."""
    with fault_upstream() as up:
        settings = local_settings([SMOL, {"name": "frontier", "kind": "openai", "model": "gpt-x",
                                          "base_url": up.url}], default_threshold=0.0,
                                  engine_restart_backoff_s=0.2, queue_timeout_s=300.0)  # as below
        app = create_app(settings)
        with serve_app(app) as base:
            backend = app.state.service.tiers[0].backend
            assert isinstance(backend, SupervisedBackend)
            # the server's loop reads the engine's answers itself (once the supervisor has handed it the pipe)
            assert _wait(lambda: backend.pipe_reader == "loop", 10)
            pid = backend.pid
            assert pid is not None
            cpu_before = backend.engine_cpu_s()
            assert cpu_before > 0  # the engine process's model load, at least

            async def run() -> list[tuple[str, Any]]:
                async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                    tasks = [asyncio.create_task(_one(client, i, stream=i % 2 == 1)) for i in range(8)]
                    while backend.health().get("active", 0) == 0:  # decoding has started
                        await asyncio.sleep(0.01)
                    os.kill(pid, sig)
                    return await asyncio.wait_for(asyncio.gather(*tasks), 60)

            started = time.monotonic()
            results = asyncio.run(run())
            assert time.monotonic() - started < 60
            # the local tier never answers with 200 (threshold 0 always escalates), so every
            # request is the frontier's: degraded where it was skipped because the engine died
            assert all(kind == "ok" and value[0] == "frontier" for kind, value in results), results
            assert any(value[1] == "smollm2-135m_engine_dead" for _, value in results), results
            assert backend.crashes == 1
            assert _wait(lambda: backend.health()["ok"], 60), backend.health()
            assert backend.pid != pid and backend.restarts == 1
            # the tier's count keeps its predecessor's CPU, and not the new engine's start-up (its
            # model load, ~1 s of CPU, is no answer's cost)
            new_pid = backend.pid
            assert new_pid is not None
            total = backend.engine_cpu_s()
            new_engine = process_cpu_s(new_pid)
            earlier = backend._cpu._base  # the killed engine's last reading
            assert new_engine is not None and cpu_before <= earlier <= total
            assert total - earlier < new_engine, (earlier, total, new_engine)
            assert _wait(lambda: backend.health()["engine_process"]["pipe_reader"] == "loop", 10)  # the new pipe too
            health = httpx.get(base.removesuffix("/v1") + "/health", timeout=10)
            assert health.status_code == 200
            metrics = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=10).text
            assert _metric(metrics, "localroute_engine_restarts_total", "smollm2-135m") == 1.0
            assert _metric(metrics, "localroute_engine_crashes_total", "smollm2-135m") == 1.0
            r = httpx.post(base + "/chat/completions", timeout=60, json={
                "model": "smollm2-135m", "messages": QUESTION, "max_tokens": 8})
            assert r.status_code == 200 and r.json()["localroute"]["tier"] == "smollm2-135m"
    # the routing log (flushed when the server stopped) keeps the skip and its reason
    with sqlite3.connect(tmp_path / "routing.db") as db:
        rows = db.execute("SELECT attempts FROM requests WHERE degraded = 'smollm2-135m_engine_dead'").fetchall()
    assert len(rows) == sum(value[1] == "smollm2-135m_engine_dead" for _, value in results)
    assert rows and all("smollm2-135m is down" in json.loads(a)[0]["error"] for (a,) in rows)


def test_local_only_crash_ends_streams_with_an_error_event_and_recovers() -> None:
    """No tier to escalate to: a stream that already sent bytes ends with an error event, the others
    get a clean 503 engine_dead, /health is 503 while the engine restarts, then 200 again."""
    # queue_timeout_s: on a loaded machine a request waiting for a slot could otherwise end as a
    # clean 503 of another kind ("local tier busy"); this test is about what the crash does
    settings = local_settings([SMOL], engine_restart_backoff_s=1.0, queue_timeout_s=300.0)
    app = create_app(settings)
    with serve_app(app) as base:
        backend = app.state.service.tiers[0].backend
        assert isinstance(backend, SupervisedBackend)
        root = base.removesuffix("/v1")

        async def run() -> tuple[list[tuple[str, Any]], int, list[tuple[str, Any]]]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                tasks = [asyncio.create_task(_one(client, i, stream=i % 2 == 1)) for i in range(6)]
                while backend.health().get("counters", {}).get("tokens_generated_total", 0) < 24:
                    await asyncio.sleep(0.01)  # until the streams have sent tokens
                os.kill(backend.pid or 0, signal.SIGSEGV)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
                down = (await client.get(root + "/health")).status_code
                during = [await _one(client, 0, stream=False), await _one(client, 1, stream=True)]
                return results, down, during

        results, down, during = asyncio.run(run())
        assert all(kind in ("ok", "error", "stream-error") for kind, _ in results)
        for kind, value in results:
            if kind == "error":
                assert value == (503, "engine_dead")
            elif kind == "stream-error":
                assert value == "engine_dead"
        assert any(kind == "stream-error" for kind, _ in results), results
        assert down == 503
        assert during == [("error", (503, "engine_dead"))] * 2
        assert _wait(lambda: httpx.get(root + "/health", timeout=5).status_code == 200, 60)
        r = httpx.post(base + "/chat/completions", timeout=60, json={
            "model": "smollm2-135m", "messages": QUESTION, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_cancelled_request_stops_in_the_engine_process() -> None:
    settings = local_settings([SMOL])
    backend = SupervisedBackend(TierSettings(**SMOL), settings)

    async def run() -> dict[str, Any]:
        try:
            task = asyncio.create_task(backend.generate(_request(max_tokens=400, ignore_eos=True)))
            while backend.health().get("active", 0) == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                h = backend.health()
                if h["counters"].get("cancelled_total", 0) >= 1 and h.get("active") == 0:
                    return h
                await asyncio.sleep(0.05)
            return backend.health()
        finally:
            await backend.aclose()

    h = asyncio.run(run())
    assert h["counters"]["cancelled_total"] == 1 and h["active"] == 0
    assert h["counters"]["tokens_generated_total"] < 400


def test_a_model_that_cannot_load_fails_at_start_with_its_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    settings = local_settings()
    with pytest.raises(LocalrouteError) as info:
        SupervisedBackend(TierSettings(name="bad", kind="llama_cpp", model=str(bad)), settings)
    assert isinstance(info.value, BackendUnavailableError)
    assert "could not load" in info.value.message


def test_a_direct_request_waiting_for_a_slot_times_out_as_busy() -> None:
    """Non-streamed plain requests skip the engine process's event loop (its reader thread submits
    them and times their wait for a slot): with the only slot taken, one is `busy` after
    queue_timeout_s, the running one still finishes and the next one is served."""
    settings = local_settings([SMOL], n_parallel=1, queue_timeout_s=0.5)
    backend = SupervisedBackend(TierSettings(**SMOL), settings)

    async def run() -> tuple[Any, float, Any, Any]:
        try:
            long = asyncio.create_task(backend.generate(_request(max_tokens=300, ignore_eos=True)))
            while backend.health().get("active", 0) == 0:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            async with asyncio.timeout(30):
                try:
                    await backend.generate(_request(max_tokens=4))
                    waited: Any = "answered"
                except BackendUnavailableError as exc:
                    waited = exc
            elapsed = time.monotonic() - t0
            async with asyncio.timeout(120):
                first = await long
                after = await backend.generate(_request(max_tokens=4))
            return waited, elapsed, first, after
        finally:
            await backend.aclose()

    waited, elapsed, first, after = asyncio.run(run())
    assert isinstance(waited, BackendUnavailableError) and "busy" in waited.message, waited
    assert 0.4 <= elapsed < 10, elapsed
    assert first.completion_tokens == 300 and after.completion_tokens > 0


# ---- the serving loop reading the engine's pipe (read_on, _LoopReader) ----

def _framed_bytes(msg: Any, long_header: bool = False) -> bytes:
    """`msg` framed as multiprocessing.Connection frames it: a 4-byte length, or -1 and 8 bytes."""
    import pickle
    import struct

    payload = pickle.dumps(msg)
    if long_header:
        return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


class _Table:
    """The calls table side of a SupervisedBackend: what its readers hand events to."""

    def __init__(self) -> None:
        self.backend = SupervisedBackend.__new__(SupervisedBackend)
        self.backend.name = "t"
        self.backend._health = {}
        self.backend._calls = {}
        self.backend._loop_reader = None
        self.got: dict[int, list[Any]] = {}

    def call(self, rid: int, loop: asyncio.AbstractEventLoop) -> None:
        from localroute.backends.supervised import _Call

        self.got[rid] = []
        self.backend._calls[rid] = _Call(loop, self.got[rid].append)


def _loops() -> list[Any]:
    import uvloop

    return [pytest.param(asyncio.new_event_loop, id="asyncio"), pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.mark.parametrize("new_loop", _loops())
def test_the_loop_reader_cuts_bytes_into_messages_and_never_waits_for_a_whole_one(new_loop: Any) -> None:
    """Messages split anywhere (inside the length header, inside the pickle), several in one write,
    a long-form header, and a message that does not unpickle: each whole message is handed on once,
    the bad one is skipped, and while a message is half-written the loop keeps running (a blocking
    `recv` on the loop would freeze the whole server until the child wrote the rest)."""
    from multiprocessing import Pipe

    from localroute.backends.supervised import _LoopReader

    loop = new_loop()
    table = _Table()
    for rid in (1, 2, 3, 4):
        table.call(rid, loop)
    reader_end, writer_end = Pipe(duplex=False)
    fd = writer_end.fileno()
    first = _framed_bytes([("done", 1, "a" * 5000)])
    rest = (_framed_bytes([("health", {"ok": True}), ("done", 2, "b")]) + b"\x00\x00\x00\x03xyz"
            + _framed_bytes([("done", 3, "c")], long_header=True) + _framed_bytes([("done", 4, "d")]))

    async def main() -> int:
        reader = _LoopReader(table.backend, reader_end, loop)
        reader.start()
        ticks = 0
        os.write(fd, first[:2])  # inside the header
        for _ in range(5):
            await asyncio.sleep(0.02)
            ticks += 1
        os.write(fd, first[2:3000])  # inside the pickle
        for _ in range(5):
            await asyncio.sleep(0.02)
            ticks += 1
        assert table.got[1] == []
        os.write(fd, first[3000:] + rest)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if table.got[4]:
                break
        writer_end.close()
        await asyncio.get_running_loop().run_in_executor(None, reader.lost.wait, 5)
        assert reader.lost.is_set() and reader_end.closed
        return ticks

    try:
        assert loop.run_until_complete(main()) == 10
    finally:
        loop.close()
    assert table.got == {1: [("done", 1, "a" * 5000)], 2: [("done", 2, "b")], 3: [("done", 3, "c")],
                         4: [("done", 4, "d")]}
    assert table.backend._health == {"ok": True}
    assert table.backend._calls == {}


@pytest.mark.parametrize("new_loop", _loops())
def test_a_closed_pipe_leaves_the_loop_clean_for_the_next_one(new_loop: Any) -> None:
    """The end of a pipe (its engine died) takes its fd out of the loop's selector before closing
    it, on the loop's thread; the restarted engine's pipe, whose fd usually has the same number,
    is then read on the same loop (a stale selector entry would leave it unread)."""
    from multiprocessing import Pipe

    from localroute.backends.supervised import _LoopReader

    loop = new_loop()
    table = _Table()
    fds = []

    async def one(rid: int) -> None:
        table.call(rid, asyncio.get_running_loop())
        reader_end, writer_end = Pipe(duplex=False)
        fds.append(reader_end.fileno())
        reader = _LoopReader(table.backend, reader_end, asyncio.get_running_loop())
        reader.start()
        writer_end.send([("done", rid, "x")])
        writer_end.close()
        await asyncio.get_running_loop().run_in_executor(None, reader.lost.wait, 5)
        assert reader.lost.is_set()

    try:
        for rid in range(3):
            loop.run_until_complete(asyncio.wait_for(one(rid), 10))
    finally:
        loop.close()
    assert table.got == {0: [("done", 0, "x")], 1: [("done", 1, "x")], 2: [("done", 2, "x")]}
    assert len(set(fds)) == 1, fds  # the same fd number each time: the case that must work


def test_read_on_a_serving_loop_answers_calls_from_it_and_from_other_loops() -> None:
    """A real engine process whose pipe a loop (in its own thread, as uvicorn's) takes over: calls
    on that loop and on another one both get their answers; once that loop has stopped, a call
    from another loop is refused at once, with an error that says why (it would wait forever)."""

    backend = SupervisedBackend(TierSettings(**SMOL), local_settings([SMOL]))
    owner = asyncio.new_event_loop()
    thread = threading.Thread(target=owner.run_forever, daemon=True)
    thread.start()
    try:
        assert backend.pipe_reader == "thread"
        ask = _request(max_tokens=4)
        before = asyncio.run(asyncio.wait_for(backend.generate(ask), 60))  # read by the supervisor thread
        owner.call_soon_threadsafe(backend.read_on, owner)
        assert _wait(lambda: backend.pipe_reader == "loop", 10)
        on_owner = asyncio.run_coroutine_threadsafe(backend.generate(ask), owner).result(60)
        elsewhere = asyncio.run(asyncio.wait_for(backend.generate(ask), 60))  # delivered across loops
        assert before.text == on_owner.text == elsewhere.text and before.text

        async def streamed() -> str:
            return "".join([d.text async for d in backend.stream(ask) if d.final is None])

        assert asyncio.run(asyncio.wait_for(streamed(), 60)) == before.text
        owner.call_soon_threadsafe(owner.stop)
        thread.join(10)
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="event loop that reads its engine's pipe is not running"):
            asyncio.run(asyncio.wait_for(backend.generate(ask), 60))
        assert time.monotonic() - started < 5
    finally:
        backend.close()
        owner.close()


@pytest.mark.parametrize("size", [-4, -100])
def test_a_length_that_is_no_header_ends_the_pipe_instead_of_spinning_the_loop(size: int) -> None:
    """A negative length other than -1 means the stream is out of step (our child never writes one):
    the reader ends the pipe, as a dead engine's, rather than loop forever on the same bytes."""
    import struct
    from multiprocessing import Pipe

    from localroute.backends.supervised import _LoopReader

    loop = asyncio.new_event_loop()
    table = _Table()
    reader_end, writer_end = Pipe(duplex=False)

    async def main() -> bool:
        reader = _LoopReader(table.backend, reader_end, asyncio.get_running_loop())
        reader.start()
        os.write(writer_end.fileno(), struct.pack("!i", size) + b"\x00" * 16)
        for _ in range(100):
            await asyncio.sleep(0.01)  # a spinning reader would never let this sleep return
            if reader.lost.is_set():
                return True
        return False

    done: dict[str, bool] = {}
    runner = threading.Thread(target=lambda: done.update(lost=loop.run_until_complete(main())), daemon=True)
    runner.start()
    runner.join(10)
    try:
        assert not runner.is_alive(), "the loop spun on a bad header"
        assert done["lost"] and reader_end.closed
    finally:
        writer_end.close()
        if not runner.is_alive():
            loop.close()


def test_a_request_crosses_stamped_and_without_the_clients_body() -> None:
    """What the parent writes for a request: `handed_at` stamped just before the write (the engine
    times the request from there) and no client body (a local engine renders the messages)."""
    import itertools
    from multiprocessing import Pipe

    from localroute.backends.supervised import _Pipes
    from localroute.types import WireRequest

    reader_end, writer_end = Pipe(duplex=False)
    backend = SupervisedBackend.__new__(SupervisedBackend)
    backend.name, backend.state, backend._owner, backend._calls = "t", "up", None, {}
    backend._ids, backend._send_lock = itertools.count(), threading.Lock()
    backend._pipes = _Pipes(reader_end, writer_end)
    body = {"model": "x", "messages": QUESTION, "max_tokens": 4}
    request = GenerationRequest(messages=tuple(QUESTION), params=SamplingParams(max_tokens=4),
                                wire=WireRequest("chat", body), native=WireRequest("messages", body))

    async def submit() -> tuple[float, float]:
        before = time.perf_counter()
        backend._submit(request, False, lambda event: None)
        return before, time.perf_counter()

    try:
        before, after = asyncio.run(submit())
        kind, rid, sent, stream = reader_end.recv()
    finally:
        reader_end.close()
        writer_end.close()
    assert (kind, rid, stream) == ("submit", 0, False)
    assert sent.wire is None and sent.native is None and request.wire is not None  # the caller's is unchanged
    assert sent.handed_at is not None and before <= sent.handed_at <= after and request.handed_at is None
    assert sent.messages == request.messages and sent.params == request.params


def test_a_reading_loop_closed_without_closing_the_tier_restarts_it_on_a_thread() -> None:
    """The loop given to read_on goes away without the tier's aclose (a start-up that failed after
    it, say): nobody would read the engine's answers or see it die. The supervisor notices, restarts
    the engine, and its reader thread reads the new pipe; calls from any loop are answered again."""

    backend = SupervisedBackend(TierSettings(**SMOL), local_settings([SMOL], engine_restart_backoff_s=0.2))
    owner = asyncio.new_event_loop()
    thread = threading.Thread(target=owner.run_forever, daemon=True)
    thread.start()
    try:
        owner.call_soon_threadsafe(backend.read_on, owner)
        assert _wait(lambda: backend.pipe_reader == "loop", 10)
        owner.call_soon_threadsafe(owner.stop)
        thread.join(10)
        owner.close()
        assert _wait(lambda: backend.restarts == 1 and backend.state == "up", 60), backend.health()
        assert backend.pipe_reader == "thread"
        answer = asyncio.run(asyncio.wait_for(backend.generate(_request(max_tokens=4)), 60))
        assert answer.text
    finally:
        backend.close()


def test_a_local_answer_is_priced_at_its_engine_processes_cpu() -> None:
    """With the engine in its own process (the default), the CPU a local answer is priced at is the
    engine's: decoding keeps a core busy for most of the answer's window. The server's own
    process_time() alone read ~0.5% of the window (0.003 s of CPU for a 0.6 s answer)."""
    settings = local_settings([SMOL], n_parallel=1)
    assert settings.engine_isolation == "process"
    app = create_app(settings)
    with serve_app(app) as base:
        assert isinstance(app.state.service.tiers[0].backend, SupervisedBackend)
        for _ in range(2):  # the first answer also warms the engine up
            r = httpx.post(base + "/chat/completions", timeout=60, json={
                "model": "smollm2-135m", "messages": QUESTION, "max_tokens": 32, "temperature": 0})
            assert r.status_code == 200, r.text
        (cost,) = r.json()["localroute"]["cost_inputs"]
    assert cost["method"] == "local_cpu"
    inputs = cost["inputs"]
    assert inputs["process_cpu_s"] >= 0.25 * inputs["window_s"], inputs
    assert cost["cost_usd"] > 0
