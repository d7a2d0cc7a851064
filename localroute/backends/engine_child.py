"""The engine process's side of a supervised local tier (the parent's side: backends/supervised.py).

`_child_main` is the `spawn`ed process's entry point: it loads the real backend and serves the
parent's pipe with `_Child` until the parent closes it or goes away. Answers and errors cross in
the engine_wire format.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from localroute.backends.engine_wire import Event, _generation_wire, _spec, _token_wire
from localroute.errors import BackendUnavailableError, LocalrouteError
from localroute.types import GenerationRequest

if TYPE_CHECKING:
    from localroute.backends.base import Backend
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Direct:
    """A non-streamed request the reader thread runs on the engine itself (no event-loop hop)."""

    job: Any
    deadline: float  # for "admitted" (the engine's queue), monotonic
    admitted: bool = False


class _Child:
    """The child's side: the real backend, one task per request, events batched per loop pass.

    A non-streamed request whose answer is one engine job (`EngineBridge.takes_direct`: n = 1, no
    tool call, the plain chat path) skips the child's event loop: the reader thread builds and
    submits its job, and the engine thread sends its "done" straight down the pipe. Every wake-up
    of a waiting thread costs ~0.1-0.2 ms on a small VM, and the loop path took four of them
    between the pipe and the engine and back (reader -> loop -> engine -> loop), this one two."""

    def __init__(self, conn: Connection | _Duplex, backend: Backend, health_interval_s: float) -> None:
        self.conn = conn
        self.backend = backend
        self.health_interval_s = health_interval_s
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.out: list[Event] = []
        self.closed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.send_lock = threading.Lock()  # the loop's flushes and the engine thread's direct answers
        self.direct: dict[int, _Direct] = {}
        self.direct_lock = threading.Lock()

    def post(self, event: Event) -> None:
        if not self.out:
            self.loop.call_soon(self.flush)  # after the tasks woken in this pass have posted theirs
        self.out.append(event)

    def flush(self) -> None:
        out, self.out = self.out, []
        if out:
            self.send(out)

    def send(self, events: list[Event]) -> None:
        try:
            with self.send_lock:
                self.conn.send(events)
        except (OSError, ValueError):  # the parent is gone
            try:
                self.loop.call_soon_threadsafe(self.closed.set)
            except RuntimeError:  # the loop is closed already
                pass

    def post_from_thread(self, event: Event) -> None:
        """`post` from the reader thread: through the loop, never a pipe write of its own. The parent's
        serving loop both writes requests (blocking) and reads answers; a reader thread blocked on
        a full answers pipe would stop reading requests, the parent's write would then block, and
        nobody would read the answers: both processes stuck for good."""
        try:
            self.loop.call_soon_threadsafe(self.post, event)
        except RuntimeError:  # the loop is closed: the parent is gone
            pass

    def _read(self) -> None:
        """Reader thread: the parent's messages onto the loop (or, for a direct request, onto the
        engine); it also times out direct requests still waiting for a slot. A closed pipe means the
        parent is gone. It never writes the answers pipe itself (post_from_thread says why)."""
        while True:
            try:
                if not self.conn.poll(self._next_deadline()):
                    self._expire()
                    continue
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = ("close",)
            try:
                if msg[0] == "submit" and not msg[3] and self._submit_direct(msg[1], msg[2]):
                    continue
                if msg[0] == "cancel" and self._cancel_direct(msg[1]):
                    continue
                if self._next_deadline() == 0.0:  # a busy stream of messages must not starve the timeouts
                    self._expire()
            except Exception:  # this thread must outlive any one message, or the pipe goes unread
                log.exception("engine process: handling a message failed")
                continue
            try:
                self.loop.call_soon_threadsafe(self.handle, msg)
            except RuntimeError:  # loop closed
                return
            if msg[0] == "close":
                self.cancel_direct_all()
                return

    def _submit_direct(self, rid: int, request: GenerationRequest) -> bool:
        from localroute.backends.threaded import EngineBridge

        backend = self.backend
        if not isinstance(backend, EngineBridge) or not backend.takes_direct(request):
            return False

        def sink(event: tuple[str, Any]) -> None:  # on the engine thread
            kind, payload = event
            if kind == "admitted":
                entry.admitted = True
                return
            if kind not in ("done", "error"):
                return
            with self.direct_lock:
                if self.direct.pop(rid, None) is None:
                    return  # timed out or cancelled meanwhile: nobody waits for it
            try:
                self.send([("done", rid, _generation_wire(payload)) if kind == "done"
                           else ("error", rid, _spec(payload))])
            except Exception as exc:  # never into the engine thread; the caller gets this request's error
                log.exception("engine process: sending an answer failed")
                self.send([("error", rid, _spec(exc))])

        entry = _Direct(None, float("inf"))
        try:
            entry.job = backend.direct_job(request, sink)
            entry.deadline = time.monotonic() + backend.queue_timeout_s  # from submit, as the loop path
            with self.direct_lock:
                self.direct[rid] = entry
            backend.engine.submit(entry.job)
        except Exception as exc:  # a template the messages break, a full queue, a prompt too long
            with self.direct_lock:
                self.direct.pop(rid, None)
            if not isinstance(exc, LocalrouteError):
                log.exception("request failed in the engine process")
            self.post_from_thread(("error", rid, _spec(exc)))
        return True

    def _cancel_direct(self, rid: int) -> bool:
        with self.direct_lock:
            entry = self.direct.pop(rid, None)
        if entry is None:
            return False
        self.backend.engine.cancel(entry.job)  # type: ignore[attr-defined]
        return True

    def cancel_direct_all(self) -> None:
        with self.direct_lock:
            doomed, self.direct = list(self.direct.values()), {}
        for entry in doomed:
            self.backend.engine.cancel(entry.job)  # type: ignore[attr-defined]

    def _next_deadline(self) -> float | None:
        """Seconds until the first direct request waiting for a slot times out (None: none waits)."""
        with self.direct_lock:
            waiting = [e.deadline for e in self.direct.values() if not e.admitted]
        return max(0.0, min(waiting) - time.monotonic()) if waiting else None

    def _expire(self) -> None:
        now = time.monotonic()
        with self.direct_lock:
            late = [(rid, e) for rid, e in self.direct.items() if not e.admitted and e.deadline <= now]
            for rid, _ in late:
                del self.direct[rid]
        for rid, entry in late:
            self.backend.engine.cancel(entry.job)  # type: ignore[attr-defined]
            timeout = self.backend.queue_timeout_s  # type: ignore[attr-defined]
            busy = BackendUnavailableError(f"local tier busy: no slot within {timeout:g}s", retry_after_s=1.0)
            self.post_from_thread(("error", rid, _spec(busy)))

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, request, stream = msg
            self.tasks[rid] = self.loop.create_task(self.serve(rid, request, stream))
        elif kind == "cancel":
            task = self.tasks.get(msg[1])
            if task is not None:
                task.cancel()
        elif kind == "close":
            self.closed.set()

    async def serve(self, rid: int, request: GenerationRequest, stream: bool) -> None:
        try:
            if stream:
                async for delta in self.backend.stream(request):
                    if delta.final is not None:
                        self.post(("done", rid, _generation_wire(delta.final)))
                    else:
                        tok = delta.token
                        self.post(("delta", rid, delta.text, None if tok is None else _token_wire(tok), delta.index,
                                   delta.finish_reason))
            else:
                self.post(("done", rid, _generation_wire(await self.backend.generate(request))))
        except asyncio.CancelledError:
            pass  # the parent cancelled it: nobody waits for an answer
        except Exception as exc:  # every failure of one request goes back to its caller
            if not isinstance(exc, LocalrouteError):
                log.exception("request failed in the engine process")
            self.post(("error", rid, _spec(exc)))
        finally:
            self.tasks.pop(rid, None)

    async def health_loop(self) -> None:
        while True:
            try:
                health = self.backend.health()
            except Exception as exc:
                health = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.post(("health", health))
            await asyncio.sleep(self.health_interval_s)

    async def run(self, info: dict[str, Any]) -> None:
        threading.Thread(target=self._read, name="engine-pipe-reader", daemon=True).start()
        self.post(("ready", info))
        beat = self.loop.create_task(self.health_loop())
        await self.closed.wait()
        beat.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        self.cancel_direct_all()
        await self.backend.aclose()


@dataclass(slots=True, eq=False)
class _Duplex:
    """The child's two pipe ends as one connection: requests read from one, events written to the other."""

    requests: Connection
    events: Connection

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.requests.poll(timeout)

    def recv(self) -> Any:
        return self.requests.recv()

    def send(self, obj: Any) -> None:
        self.events.send(obj)


def _child_main(requests: Connection, events: Connection, tier: TierSettings, settings: Settings,
                health_interval_s: float) -> None:
    """Entry point of the engine process (spawned: a fresh interpreter, no inherited threads)."""
    conn = _Duplex(requests, events)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; it closes this process
    # as `serve` does for its own process: how long the loop thread may wait for the GIL behind the
    # engine thread (Python's default of 5 ms put that wait on every answer's way out)
    sys.setswitchinterval(settings.switch_interval_s)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s engine[%(process)d] %(message)s")
    from localroute.backends.base import load_backend

    try:
        backend = load_backend(tier, settings)
        info = {"pid": os.getpid(), "fingerprint": backend.fingerprint(), "uses_gpu": backend.uses_gpu,
                "model": backend.model, "capabilities": backend.capabilities}
    except BaseException as exc:
        conn.send([("failed", _spec(exc))])
        return

    gc.collect()  # the loaded engine's start-up heap, kept out of the collections while serving
    gc.freeze()  # (localroute.server.app.freeze_startup_heap says why)
    info["gc_frozen"] = gc.get_freeze_count()

    async def main() -> None:
        await _Child(conn, backend, health_interval_s).run(info)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
