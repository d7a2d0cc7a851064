"""Who reads the engine process's pipe (backends/supervised.py): the event loop that calls the
engine adopts it (`add_reader`, one thread hand-off fewer per answer), the supervisor thread reads
it before any loop has and after the adopting loop closed, and calls from another loop, running in
another thread meanwhile, are still answered through that loop's own wake-up."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from localroute.backends.supervised import SupervisedBackend
from localroute.settings import TierSettings
from localroute.types import Generation, GenerationRequest, SamplingParams
from tests.conftest import local_settings

pytestmark = pytest.mark.slow

SMOL = {"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}


def _request(max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": "Name three colours."},),
                             params=SamplingParams(max_tokens=max_tokens, temperature=0.0), request_id="t")


def test_the_pipe_is_read_by_the_calling_loop_then_the_supervisor_then_any_loop_that_asks() -> None:
    backend = SupervisedBackend(TierSettings(**SMOL), local_settings([SMOL], n_parallel=2))
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        seen: list[Any] = []

        async def first() -> Generation:
            gen = await backend.generate(_request())
            seen.append(backend._reader_loop is asyncio.get_running_loop())
            return gen

        answer = asyncio.run(first())  # this loop adopted the pipe, then closed
        assert seen == [True] and answer.completion_tokens > 0

        backend._health = {}  # the child reports every 0.25 s: someone must read it with no loop left
        deadline = time.monotonic() + 10
        while not backend._health and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend._health, "nobody read the engine's pipe after the adopting loop closed"

        async def from_other() -> Generation:
            return await backend.generate(_request())

        async def both() -> list[Generation]:
            there = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(from_other(), other))
            await asyncio.sleep(0.2)  # the other loop (running throughout) adopts first
            here = backend.generate(_request())  # answered through that loop's read
            return list(await asyncio.wait_for(asyncio.gather(here, there), 60))

        answers = asyncio.run(both())
        assert backend._reader_loop is other
        assert [g.text for g in answers] == [answer.text, answer.text]  # greedy: the same answer

        again = asyncio.run(asyncio.wait_for(backend.generate(_request()), 60))  # other still reads
        assert again.text == answer.text
    finally:
        backend.close()
        other.call_soon_threadsafe(other.stop)
        thread.join(5)
        other.close()
