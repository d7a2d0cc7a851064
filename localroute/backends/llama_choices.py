"""n > 1 on a llama.cpp tier: one request's choices run as waves of sibling sequences.

This module owns the asyncio side of an n > 1 request: splitting the choices into waves of at most
`n_parallel` (all the slots there are), submitting each wave's leader (choice 0 of the wave) with
its siblings, waiting (within queue_timeout_s) until every choice of the wave has a slot, running
the waves in turn, cancelling whatever has not finished when the caller goes away, and turning the
choices' engine events into one answer (`generate_choices`) or a stream (`stream_choices`), the
choices combined into one Generation (`combined`).

It does not own the engine side (backends.llama_cpp.LlamaEngine admits a wave together, prefills
the leader's prompt once and copies its KV to the siblings' sequences) nor what a choice's job is
(LlamaCppBackend builds it: chat template, tokens, sampler); the backend hands in `make_jobs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar, cast

from localroute.backends.threaded import Outbox, Sink
from localroute.errors import BackendUnavailableError
from localroute.types import Generation, StreamDelta


class ChoiceJob(Protocol):
    """An engine job that can lead a wave: the engine admits it with `siblings`, each one slot."""

    choice: int
    siblings: list[Any]


class WaveEngine(Protocol):
    """What the waves need of the engine (backends.llama_cpp.LlamaEngine)."""

    n_parallel: int
    outbox: Outbox

    def submit(self, job: Any) -> None: ...

    def cancel(self, job: Any) -> None: ...


J = TypeVar("J", bound=ChoiceJob)
# sinks[i] receives choice i's events; returns the n jobs in choice order (job i has choice == i)
MakeJobs = Callable[[list[Sink]], list[J]]
ChoiceEvent = tuple[int, str, Any]  # (choice index, kind, payload): threaded.py's events, tagged


async def choice_events(engine: WaveEngine, n: int, make_jobs: MakeJobs[J],
                        queue_timeout_s: float) -> AsyncIterator[ChoiceEvent]:
    """The events of an n > 1 request as (choice index, kind, payload), each as it arrives.

    The choices run as parallel sequences in waves of at most `engine.n_parallel`. In a wave,
    choice 0 prefills the prompt and the others get a copy of its KV (LlamaEngine._share_prompt),
    so a wave prefills the prompt once and decodes its choices in the same batch. A wave waits
    until it has a slot per choice (first come first served, within `queue_timeout_s` like any
    request); with n above the slot count the waves run in turn, each after the previous one, the
    next wave's prompt then mostly a prefix-cache hit."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()  # ChoiceEvent; Any: the Outbox posts (kind, payload) events
    outbox = engine.outbox

    def sink_for(index: int) -> Sink:
        def sink(event: tuple[str, Any]) -> None:
            try:
                tagged: Any = (index, *event)
                outbox.post(loop, queue.put_nowait, tagged)
            except RuntimeError:  # the caller's loop is closed: nobody waits for it
                pass
        return sink

    jobs = make_jobs([sink_for(i) for i in range(n)])
    wave = max(1, engine.n_parallel)
    finished: set[int] = set()
    try:
        for start in range(0, n, wave):
            group = jobs[start:start + wave]
            leader = group[0]
            leader.siblings = group[1:]
            engine.submit(leader)
            admitted = 0
            try:
                async with asyncio.timeout(queue_timeout_s):
                    while admitted < len(group):
                        index, kind, payload = await queue.get()
                        if kind == "error":
                            raise payload
                        admitted += kind == "admitted"
            except TimeoutError:
                raise BackendUnavailableError(
                    f"local tier busy: no {len(group)} slots within {queue_timeout_s:g}s",
                    retry_after_s=1.0) from None
            done = 0
            while done < len(group):
                index, kind, payload = await queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    finished.add(index)
                    done += 1
                yield index, kind, payload
    finally:
        for job in jobs:
            if job.choice not in finished:
                engine.cancel(job)


async def generate_choices(engine: WaveEngine, n: int, make_jobs: MakeJobs[J],
                           queue_timeout_s: float) -> Generation:
    """n > 1 without streaming: every choice, or the first one the engine stopped early (its
    tier's threshold out of reach: the cascade escalates the whole request on it, so the
    others are cancelled rather than finished)."""
    gens: list[Generation | None] = [None] * n
    async for index, kind, payload in choice_events(engine, n, make_jobs, queue_timeout_s):
        if kind == "done":
            if "early_exit" in payload.extra:
                return cast(Generation, payload)
            gens[index] = payload
    return combined(gens)


async def stream_choices(engine: WaveEngine, n: int, make_jobs: MakeJobs[J],
                         queue_timeout_s: float) -> AsyncIterator[StreamDelta]:
    """n > 1 streamed: each choice's tokens as they come, tagged with its `index`; a choice's finish
    delta (its finish_reason, no text) as soon as it is done, as OpenAI sends it, except for the
    last choice to finish, whose finish the final delta carries (with every choice:
    Generation.choices)."""
    gens: list[Generation | None] = [None] * n
    left = n
    async for index, kind, payload in choice_events(engine, n, make_jobs, queue_timeout_s):
        if kind == "token":
            text, tok = payload
            yield StreamDelta(text=text, token=tok, index=index)
        elif kind == "done":
            gens[index] = payload
            left -= 1
            if left:
                yield StreamDelta(text="", index=index, finish_reason=payload.finish_reason)
    yield StreamDelta(text="", final=combined(gens))


def combined(gens: list[Generation | None]) -> Generation:
    """The choices of an n > 1 answer as one Generation: choice 0 carrying the others, the prompt
    counted once and completion_tokens summed over the choices."""
    assert all(g is not None for g in gens)
    done = cast(list[Generation], gens)
    first = done[0]
    first.choices = done[1:]
    first.completion_tokens = sum(g.completion_tokens for g in done)
    first.latency_s = max(g.latency_s for g in done)
    return first
