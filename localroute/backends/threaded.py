"""The asyncio side of a local engine that decodes on its own thread (llama.cpp, transformers).

The engine thread reports each request's progress through a `sink` as events: ("admitted", None)
when it gets a slot, ("token", (text, TokenLogprob | None)) while streaming, ("done", Generation)
at the end, ("error", LocalrouteError) on failure. This mixin turns those into the Backend
contract's `generate` and `stream`, bounds the wait for a slot, and cancels the engine's work when
the caller goes away (a cancelled task or a closed stream).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from localroute.backends.capabilities import Capabilities, default_capabilities
from localroute.backends.decoding import DecodeState, prompt_room
from localroute.calibration_file import model_fingerprint
from localroute.errors import BackendUnavailableError
from localroute.types import Generation, GenerationRequest, StreamDelta

Event = tuple[str, Any]
Sink = Callable[[Event], None]


def _deliver(calls: list[tuple[Callable[[Event], None], Event]]) -> None:
    for fn, event in calls:
        fn(event)


class Outbox:
    """Engine-thread events for asyncio queues, delivered with one event-loop wake-up per batch.

    Each `call_soon_threadsafe` writes to the loop's self-pipe and hands the GIL to the woken loop;
    with one per token the engine thread waited for the GIL again after every row of a batched step
    (a py-spy profile of the server at 4 streams showed it waiting in that write). Inside `batch()` the
    engine thread's events are collected and sent together when it ends; elsewhere (other threads,
    outside a batch) they go at once."""

    def __init__(self) -> None:
        self._local = threading.local()

    def post(self, loop: asyncio.AbstractEventLoop, fn: Callable[[Event], None], event: Event) -> None:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            loop.call_soon_threadsafe(fn, event)
        else:
            pending.setdefault(loop, []).append((fn, event))

    @contextmanager
    def batch(self) -> Iterator[None]:
        self._local.pending = {}
        try:
            yield
        finally:
            pending, self._local.pending = self._local.pending, None
            for loop, calls in pending.items():
                try:
                    loop.call_soon_threadsafe(_deliver, calls)
                except RuntimeError:  # that loop is closed: nobody is waiting for these events
                    pass


class ThreadedEngine(Protocol):
    def submit(self, job: Any) -> None: ...

    def cancel(self, job: Any) -> None: ...


class EngineBridge(ABC):
    """Mixin: the request set-up every thread-driven engine shares (tokenise, check the context,
    build its DecodeState), then the Backend contract over the engine's events. Subclasses set
    `engine`, `queue_timeout_s` and `context_tokens`, and implement `prompt_tokens` and `_state`."""

    engine: ThreadedEngine
    queue_timeout_s: float
    name: str
    kind: str
    is_local = True

    @property
    def uses_gpu(self) -> bool | None:
        return None  # unknown here: the cost ledger reads the engine's device from health()

    @property
    def model(self) -> str:
        path = getattr(self.engine, "model_path", None)
        return Path(path).name if path is not None else str(getattr(self.engine, "model_name", ""))

    @property
    def capabilities(self) -> Capabilities:
        return replace(default_capabilities(self.kind, True), context_tokens=self.context_tokens)

    def fingerprint(self) -> dict[str, Any]:
        path = getattr(self.engine, "model_path", None)  # engines differ: a GGUF file, or a checkpoint
        template = getattr(self.engine, "chat_template", None)
        return model_fingerprint(Path(path) if path is not None else None,
                                 template() if callable(template) else None, self.model or self.name)

    @property
    @abstractmethod
    def context_tokens(self) -> int:
        """Context per request (prompt + answer) in tokens."""

    @abstractmethod
    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The token ids the model sees for this request."""

    @abstractmethod
    def _state(self, request: GenerationRequest, **common: Any) -> DecodeState:
        """The engine's per-request state: `common` holds DecodeState's fields, the engine adds its own."""

    def _job(self, request: GenerationRequest, sink: Sink, want_tokens: bool) -> DecodeState:
        """The engine's per-request object (tokenised prompt, sampling state, the sink)."""
        # engine time starts here (or where the tier was handed the request: an engine process's pipe);
        # template and tokenising are its work
        submitted_at = time.perf_counter() if request.handed_at is None else request.handed_at
        prompt = self.prompt_tokens(request)
        params = request.params
        room = prompt_room(prompt, self.context_tokens)
        return self._state(
            request,
            request_id=request.request_id or uuid.uuid4().hex,
            prompt=prompt,
            params=params,
            max_new=max(1, min(params.max_tokens, room)),
            sink=sink,
            want_tokens=want_tokens,
            submitted_at=submitted_at,
        )

    def takes_direct(self, request: GenerationRequest) -> bool:
        """Whether `generate(request)` is exactly one engine job's "done" answer, so a caller may run
        that job itself (`direct_job`): the engine process does, skipping its event loop. Engines whose
        `generate` does more for some requests (n > 1, tool calls) say False for those."""
        return type(self).generate is EngineBridge.generate

    def direct_job(self, request: GenerationRequest, sink: Sink) -> DecodeState:
        """The engine job of a non-streamed request, its events going straight to `sink` (called on
        the engine thread: "admitted", then "done" or "error"); the caller submits it to `engine`,
        bounds the wait for "admitted" by `queue_timeout_s` and cancels it through `engine.cancel`."""
        return self._job(request, sink, want_tokens=False)

    async def _events(self, request: GenerationRequest, want_tokens: bool) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        outbox: Outbox | None = getattr(self.engine, "outbox", None)

        def sink(event: Event) -> None:
            try:
                if outbox is not None:
                    outbox.post(loop, queue.put_nowait, event)
                else:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                # the caller's event loop is closed: nobody waits for this event, and a caller that
                # has gone must not raise in (and kill) the engine thread
                pass

        job = self._job(request, sink, want_tokens)
        self.engine.submit(job)
        finished = False
        try:
            try:
                async with asyncio.timeout(self.queue_timeout_s):  # no extra task, unlike wait_for
                    kind, payload = await queue.get()  # "admitted"
            except TimeoutError:
                raise BackendUnavailableError(
                    f"local tier busy: no slot within {self.queue_timeout_s:g}s", retry_after_s=1.0
                ) from None
            if kind == "error":  # the engine failed or stopped while this request waited
                finished = True
                raise payload
            while True:
                kind, payload = await queue.get()
                if kind == "error":
                    finished = True
                    raise payload
                finished = kind == "done"
                yield kind, payload
                if finished:
                    return
        finally:
            if not finished:
                self.engine.cancel(job)

    async def generate(self, request: GenerationRequest) -> Generation:
        async for kind, payload in self._events(request, want_tokens=False):
            if kind == "done":
                gen: Generation = payload
                return gen
        raise BackendUnavailableError("local engine ended without an answer")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        async for kind, payload in self._events(request, want_tokens=True):
            if kind == "token":
                text, tok = payload
                yield StreamDelta(text=text, token=tok)
            elif kind == "done":
                yield StreamDelta(text="", final=payload)
