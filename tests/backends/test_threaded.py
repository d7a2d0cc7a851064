"""The engine-thread -> event-loop hand-off (backends/threaded.Outbox)."""

from __future__ import annotations

import asyncio
import threading

from localroute.backends.threaded import Event, Outbox


def test_a_batch_arrives_in_order_with_one_wake_up_and_outside_a_batch_at_once() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        box = Outbox()
        got: list[Event] = []
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*args: object) -> object:
            nonlocal wakeups
            wakeups += 1
            return real(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def engine_thread() -> None:
            with box.batch():
                for i in range(4):
                    box.post(loop, got.append, ("token", i))
            box.post(loop, got.append, ("done", None))  # outside a batch: at once

        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
        for _ in range(100):
            if len(got) == 5:
                break
            await asyncio.sleep(0.001)
        assert got == [("token", 0), ("token", 1), ("token", 2), ("token", 3), ("done", None)]
        assert wakeups == 2

    asyncio.run(run())


def test_a_closed_loop_does_not_break_the_engine_thread() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    box = Outbox()
    delivered: list[Event] = []
    with box.batch():
        box.post(loop, delivered.append, ("token", 1))  # delivered at the end of the batch: dropped
    assert delivered == [] and box._local.pending is None  # no exception, nothing left queued
    with box.batch():  # and the outbox still works for the next step
        box.post(loop, delivered.append, ("token", 2))
    assert box._local.pending is None


def test_the_engine_times_a_request_from_its_hand_off_when_one_is_stamped() -> None:
    """An engine process's parent stamps `handed_at` before its pipe write: the engine's time (and so
    the router overhead, which is the rest) then counts that hop as the engine's, as waking an
    in-process engine thread is. Unstamped, the engine starts its clock when it gets the request.
    (DecodeState.finish reports `latency_s` from `submitted_at`.)"""
    import time
    from dataclasses import replace

    from localroute.types import GenerationRequest, SamplingParams
    from tests.fakes import ScriptedEngineBridge

    backend = ScriptedEngineBridge()
    request = GenerationRequest(messages=({"role": "user", "content": "hello"},), params=SamplingParams(max_tokens=4))
    try:
        before = time.perf_counter()
        plain = backend.direct_job(request, lambda event: None)
        handed_at = time.perf_counter() - 2.0
        stamped = backend.direct_job(replace(request, handed_at=handed_at), lambda event: None)
    finally:
        backend.engine.close()
    assert before <= plain.submitted_at <= time.perf_counter()
    assert stamped.submitted_at == handed_at
