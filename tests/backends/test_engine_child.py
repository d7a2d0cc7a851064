"""The engine process's side (backends/engine_child.py), driven as the parent drives it: the real
`_Child` serving one end of a real multiprocessing Pipe, a scripted thread-driven engine behind it
(tests/fakes.ScriptedEngineBridge), and this test holding the parent's end. These are the direct
path's failure modes (a non-streamed plain request submitted by the pipe-reader thread, answered
from the engine thread): each must end as that request's answer or error, never as a dead thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import pytest

from localroute.backends.engine_child import _Child
from localroute.backends.engine_wire import Event
from localroute.backends.supervised import SupervisedBackend
from localroute.settings import TierSettings
from localroute.types import Generation, GenerationRequest, SamplingParams
from tests.conftest import local_settings
from tests.fakes import ScriptedEngineBridge

WAIT_S = 10.0  # how long a test waits for an answer that must come (a loaded 2-core machine)


def _request(text: str, request_id: str) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=SamplingParams(max_tokens=8),
                             request_id=request_id)


@dataclass
class _Parent:
    """The parent's end of the pipe, with the arrival time of each request's last event."""

    conn: Connection
    child: _Child

    def submit(self, rid: int, text: str, stream: bool = False) -> float:
        sent = time.monotonic()
        self.conn.send(("submit", rid, _request(text, f"r{rid}"), stream))
        return sent

    def answer(self, rid: int, timeout_s: float = WAIT_S) -> tuple[Event, float]:
        """Request `rid`'s "done" or "error" event and when it arrived; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0 and self.conn.poll(left):
            for event in self.conn.recv():
                if event[0] in ("done", "error") and event[1] == rid:
                    return event, time.monotonic()
        pytest.fail(f"request {rid}: no answer within {timeout_s:g}s")


@contextmanager
def _serving(backend: ScriptedEngineBridge) -> Iterator[_Parent]:
    """`_Child.run` on its own thread and event loop, as `_child_main` runs it in the engine process."""
    conn, end = Pipe(duplex=True)
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        started["child"] = child = _Child(end, backend, health_interval_s=60.0)
        started["loop"] = asyncio.get_running_loop()
        ready.set()
        await child.run({"pid": 0})

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="engine-child-main", daemon=True)
    thread.start()
    assert ready.wait(WAIT_S)
    child: _Child = started["child"]
    first = conn.recv()
    assert first[0] == ("ready", {"pid": 0}), first
    try:
        yield _Parent(conn, child)
    finally:
        # set directly, not by a "close" message: a test that fails may have left no reader thread
        started["loop"].call_soon_threadsafe(child.closed.set)
        thread.join(WAIT_S)
        conn.close()  # the reader thread, if alive, sees the pipe close and ends
        backend.engine.close()


@pytest.mark.parametrize("script", ["unpicklable", "unbuildable"])
def test_an_answer_that_cannot_be_built_or_sent_is_that_requests_error(script: str) -> None:
    """The engine thread sends a direct answer itself: an answer the pipe's format cannot encode, or
    one pickle refuses, is that request's error (a 503 of the engine's), and the engine thread,
    which a raise into it would end, goes on serving the next request."""
    backend = ScriptedEngineBridge()
    with _serving(backend) as parent:
        parent.submit(1, script)
        (kind, rid, spec), _ = parent.answer(1)
        assert (kind, rid, spec[0]) == ("error", 1, "BackendUnavailableError"), spec
        assert spec[1].startswith("local engine error: ")
        assert ("pickle" in spec[1]) == (script == "unpicklable"), spec
        parent.submit(2, "hello")
        (kind, rid, wire), _ = parent.answer(2)
        assert (kind, rid, wire[0]) == ("done", 2, "ok fine")
        assert backend.engine.alive()


@pytest.mark.parametrize("bad", [(), ("submit",), ("submit", 9), None, 42], ids=repr)
def test_the_reader_thread_survives_a_malformed_message(bad: Any) -> None:
    """One message the reader thread cannot handle is logged and skipped: the thread is the only
    reader of the pipe, so its death would leave every later request unanswered."""
    with _serving(ScriptedEngineBridge()) as parent:
        parent.conn.send(bad)
        parent.submit(1, "hello")  # direct path
        (kind, rid, wire), _ = parent.answer(1)
        assert (kind, rid, wire[0]) == ("done", 1, "ok fine")
        parent.submit(2, "hello", stream=True)  # through the child's event loop
        (kind, rid, wire), _ = parent.answer(2)
        assert (kind, rid, wire[0]) == ("done", 2, "ok fine")


def _framed(msg: Any) -> bytes:
    """`msg` as a Connection writes it to its pipe (length header and pickle), captured from one."""
    reader, writer = Pipe(duplex=False)
    try:
        writer.send(msg)
        return os.read(reader.fileno(), 1 << 16)
    finally:
        reader.close()
        writer.close()


def test_a_busy_timeout_fires_while_other_messages_keep_arriving() -> None:
    """A direct request waits for a slot until queue_timeout_s, timed by the reader thread between
    messages: a pipe that always holds another message must not postpone its "busy" error to the
    end of that stream. The stream is written in blocks of many messages, so the pipe is never
    empty while it lasts (one message per send could leave it empty between two)."""
    timeout_s, stream_s = 0.3, 4.0
    backend = ScriptedEngineBridge(queue_timeout_s=timeout_s)
    with _serving(backend) as parent:
        parent.submit(1, "hold")  # takes the only slot until released
        block = _framed(("cancel", 10_000)) * 2000  # cancels of nothing
        stop = threading.Event()

        def chatter() -> None:  # until the answer came or stream_s passed
            end = time.monotonic() + stream_s
            while not stop.is_set() and time.monotonic() < end:
                left = memoryview(block)
                while left:
                    left = left[os.write(parent.conn.fileno(), left):]
            stop.set()

        sender = threading.Thread(target=chatter, daemon=True)
        try:
            sent = parent.submit(2, "hello")
            sender.start()
            (kind, rid, spec), arrived = parent.answer(2)
            still_chattering = not stop.is_set()
        finally:
            stop.set()
            sender.join(WAIT_S)
        assert (kind, rid, spec[0]) == ("error", 2, "BackendUnavailableError") and "busy" in spec[1], spec
        assert still_chattering, f"the busy error came {arrived - sent:.2f}s after submit, after the stream"
        assert timeout_s <= arrived - sent < timeout_s + 2.0, arrived - sent
        backend.engine.release.set()
        (kind, rid, wire), _ = parent.answer(1)
        assert (kind, rid, wire[0]) == ("done", 1, "ok fine")


def test_the_slot_wait_is_timed_from_the_engine_submit() -> None:
    """As on the event-loop path (EngineBridge._events), the queue_timeout_s wait for a slot starts
    when the job is submitted to the engine: building it (the chat template, tokenising a long
    prompt) is the engine's work, not time spent waiting for a slot."""
    timeout_s, slow_s = 0.3, 0.5
    backend = ScriptedEngineBridge(queue_timeout_s=timeout_s, slow_s=slow_s)
    with _serving(backend) as parent:
        parent.submit(1, "hold")
        sent = parent.submit(2, "slow")
        (kind, rid, spec), arrived = parent.answer(2)
        assert (kind, rid, spec[0]) == ("error", 2, "BackendUnavailableError") and "busy" in spec[1], spec
        submitted = backend.engine.submitted["r2"]
        assert submitted - sent >= slow_s  # tokenised first, then submitted
        assert timeout_s <= arrived - submitted < timeout_s + 2.0, arrived - submitted
        backend.engine.release.set()
        (kind, rid, wire), _ = parent.answer(1)
        assert (kind, rid, wire[0]) == ("done", 1, "ok fine")


@pytest.mark.slow
def test_the_real_engine_process_serves_on_after_a_malformed_message() -> None:
    """The same through a real engine process (spawned, SmolLM2 on llama.cpp): a message the reader
    thread cannot handle is skipped, and the next request, on the direct path, is answered."""
    tier = TierSettings(name="smollm2-135m", kind="llama_cpp", model="smollm2-135m")
    backend = SupervisedBackend(tier, local_settings())

    async def run() -> Generation:
        try:
            backend._send(("submit",))  # no parent sends this: the child's reader must outlive it
            async with asyncio.timeout(120):
                return await backend.generate(GenerationRequest(
                    messages=({"role": "user", "content": "Name three colours."},),
                    params=SamplingParams(max_tokens=4, temperature=0.0), request_id="after"))
        finally:
            await backend.aclose()

    gen = asyncio.run(run())
    assert gen.completion_tokens > 0 and backend.crashes == 0


def test_the_parent_reader_survives_a_call_cancelled_while_its_answer_is_read() -> None:
    """The pipe's reader takes a finished call out of the table while the caller's own `finally` (a
    cancel) may take it out too: losing that race must not end the reader (it would leave every
    other call waiting forever)."""

    from localroute.backends.supervised import SupervisedBackend, _Call

    class Racing(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:  # the caller pops right after the lookup
            value = super().get(key, default)
            super().pop(key, None)
            return value

    loop = asyncio.new_event_loop()
    try:
        other: asyncio.Queue[Any] = asyncio.Queue()
        backend = SupervisedBackend.__new__(SupervisedBackend)
        backend._health = {}
        backend._calls = Racing({1: _Call(loop, asyncio.Queue().put_nowait), 2: _Call(loop, other.put_nowait)})

        batch = [("delta", 1, "x", None, 0, None), ("done", 1, None), ("done", 2, None)]
        backend._dispatch(batch, None)  # as the reader thread (or the serving loop's reader) hands it on
        loop.run_until_complete(asyncio.sleep(0))
        assert other.qsize() == 1  # the batch's other call still got its answer
    finally:
        loop.close()


def test_a_burst_of_requests_with_errors_never_deadlocks_the_two_processes() -> None:
    """The parent's serving loop writes requests (blocking) and reads the answers itself: if the
    child's reader thread ever waited on a full answers pipe (to send an error of its own: a prompt
    too long, a full queue, a slot timeout), it would stop reading requests, the parent's write
    would then block, and nobody would read the answers again. A burst of 400 requests, 3 that
    fail in the reader thread, and 400 more must all be answered (the real _Child and the real
    parent's reader over two real pipes; before the fix this hung within a second)."""
    import itertools
    from dataclasses import replace

    from localroute.backends.engine_child import _Duplex
    from localroute.backends.supervised import _LoopReader, _Pipes

    requests_in, requests_out = Pipe(duplex=False)
    events_in, events_out = Pipe(duplex=False)
    engine = ScriptedEngineBridge()
    ready = threading.Event()
    started: dict[str, Any] = {}

    async def child_main() -> None:
        started["child"] = child = _Child(_Duplex(requests_in, events_out), engine, health_interval_s=60.0)
        started["loop"] = asyncio.get_running_loop()
        ready.set()
        await child.run({"pid": 0})

    threading.Thread(target=asyncio.run, args=(child_main(),), daemon=True).start()
    assert ready.wait(WAIT_S)
    assert events_in.recv() == [("ready", {"pid": 0})]
    backend = SupervisedBackend.__new__(SupervisedBackend)
    backend.name, backend.state, backend._health = "t", "up", {}
    backend._calls, backend._ids, backend._send_lock = {}, itertools.count(), threading.Lock()
    backend._loop_reader, backend._pipes = None, _Pipes(events_in, requests_out)
    ok = _request("hi there", "ok")
    too_long = replace(ok, messages=({"role": "user", "content": "word " * 20000},))  # > the 1024-token context

    async def burst() -> list[Any]:
        loop = asyncio.get_running_loop()
        backend._owner = loop
        _LoopReader(backend, events_in, loop).start()
        asks = [ok] * 400 + [too_long] * 3 + [ok] * 400  # every _submit runs in one loop pass
        return await asyncio.gather(*(backend.generate(r) for r in asks), return_exceptions=True)

    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(out=asyncio.run(burst())), daemon=True)
    runner.start()
    runner.join(30.0)
    try:
        assert not runner.is_alive(), "deadlock: the burst got no answers within 30 s"
        out = result["out"]
        assert sum(isinstance(r, Generation) for r in out) == 800
        errors = [r for r in out if not isinstance(r, Generation)]
        assert len(errors) == 3 and all("context" in str(e).lower() or "long" in str(e).lower() for e in errors), errors
    finally:
        started["loop"].call_soon_threadsafe(started["child"].closed.set)
        engine.engine.close()
