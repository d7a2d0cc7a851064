"""A local engine in a supervised child process: its crash is a tier that is down, never a dead server.

This module is the parent's (server's) side: `SupervisedBackend` spawns, reads and restarts the
engine process. The child's side is backends/engine_child.py, the pipe's format backends/engine_wire.py.

llama.cpp and torch run native code; a fault there (a SIGSEGV in a CPU kernel, an abort in a CUDA
driver) kills whatever process holds them. vLLM's AsyncLLM keeps EngineCore in a child process for
the same reason; here each thread-driven local tier (llama.cpp, transformers) runs in its own
`spawn`ed process and the server talks to it over one pipe:

    parent (server)                          child (one per local tier)
    SupervisedBackend.generate/stream  --->  ("submit", id, request, stream) -> the real backend
    the serving loop (or a reader thread)  <--- lists of events ---  ("delta" | "done" | "error", id, ...),
                                                                     ("health", {...})

Two one-way pipes, not one socket: the parent's end of the events pipe is read without blocking
(`read_on(loop)`, which the server's lifespan calls: the serving loop reads it itself, so an answer
wakes the loop directly instead of a reader thread that then wakes the loop, one thread hand-off
less on every request), while the requests pipe stays blocking for its writers. Until a loop takes
the pipe over (and for every other user: `localroute ask`, eval, tests) the supervisor thread reads
it. The loop reads whatever bytes are there and cuts them into messages itself, so a child that
stops halfway through a message never stalls the loop; the fd leaves the loop's selector before it
is closed, on the loop's own thread, so a restarted engine's new pipe (often the same fd number)
starts clean.

A child's events are sent in batches, one pipe write per event-loop pass (a whole engine step's
tokens for every request together), so the per-token path gains one pickle and one pipe hop, not a
thread hand-off per token; tokens and answers cross as tuples of primitives (TokenWire,
GenerationWire), rebuilt into dataclasses by the waiting caller. When the child dies, its reader
(loop or thread) sees the pipe close: every call in flight ends with `EngineDeadError` (the cascade escalates
past the tier, a stream that already sent bytes ends with an error event), `health()` says the tier
is down, new calls fail fast with the same error until the engine is back, and the engine is
restarted with exponential backoff.

A request that fails inside the engine (a bad parameter, a grammar it cannot build) is an ordinary
error of that request: it comes back as the same LocalrouteError and the engine keeps running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import selectors
import signal
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from localroute.backends.capabilities import Capabilities, default_capabilities
from localroute.backends.engine_child import _child_main
from localroute.backends.engine_cpu import EngineCpu
from localroute.backends.engine_wire import Event, _generation, _rebuild, _spec, _token
from localroute.errors import BackendUnavailableError, EngineDeadError, LocalrouteError
from localroute.types import Generation, GenerationRequest, StreamDelta

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from localroute.backends.base import Backend
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)

# kinds whose engine runs native code in this process unless isolated (vLLM has its own engine process)
ISOLATED_KINDS = frozenset({"llama_cpp", "transformers"})


@dataclass(slots=True, eq=False)
class _Call:
    loop: asyncio.AbstractEventLoop
    put: Callable[[Event], None]  # on `loop`'s thread only


def _deliver(items: list[tuple[Callable[[Event], None], Event]]) -> None:
    for put, event in items:
        put(event)


def _exit_reason(proc: BaseProcess) -> str:
    code = proc.exitcode
    if code is None:
        return "pipe closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_HEADER = struct.Struct("!i")  # multiprocessing.Connection's framing: a signed 32-bit length,
_LONG = struct.Struct("!Q")  # or -1 and then a 64-bit one, before each pickled message


@dataclass(slots=True, eq=False)
class _Pipes:
    """The parent's ends: it reads the child's events from one pipe and writes requests to the other."""

    events: Connection
    requests: Connection


class _LoopReader:
    """The events pipe read by an event loop (`add_reader`, non-blocking reads): whatever bytes have
    arrived are cut into messages here, so a message only partly written never blocks the loop.
    At the pipe's end (the child died or exited) the fd leaves the selector, then is closed, both on
    the loop's thread, and `lost` tells the supervisor."""

    def __init__(self, backend: SupervisedBackend, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.conn = conn
        self.loop = loop
        self.fd = conn.fileno()
        self.buf = bytearray()
        self.lost = threading.Event()

    def start(self) -> None:
        os.set_blocking(self.fd, False)
        try:
            self.loop.add_reader(self.fd, self.readable)
        except Exception:  # never registered: nothing to take out
            log.exception("local tier %s: the event loop cannot read the engine pipe", self.backend.name)
            self.end(registered=False)
        else:
            self.backend._loop_reader = self
            self.readable()  # what arrived before the hand-over

    def readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.end()
            return
        buf = self.buf
        buf += data
        start = 0
        while True:
            if len(buf) - start < 4:
                break
            (size,) = _HEADER.unpack_from(buf, start)
            head = 4
            if size == -1:
                if len(buf) - start < 12:
                    break
                (size,) = _LONG.unpack_from(buf, start + 4)
                head = 12
            elif size < 0:  # not a header: the stream is out of step, as good as a dead engine
                log.error("local tier %s: the engine pipe is out of step (length %d); restarting it",
                          self.backend.name, size)
                self.end()
                return
            end = start + head + size
            if len(buf) < end:
                break
            try:
                batch = pickle.loads(bytes(buf[start + head:end]))
                self.backend._dispatch(batch, self.loop)
            except Exception:  # one bad message must not end the reading of every later one
                log.exception("local tier %s: an engine message could not be read", self.backend.name)
            start = end
        if start:
            del buf[:start]

    def end(self, registered: bool = True) -> None:
        if self.lost.is_set():
            return
        if registered:
            self.loop.remove_reader(self.fd)
        if self.backend._loop_reader is self:
            self.backend._loop_reader = None
        self.conn.close()
        self.lost.set()


class SupervisedBackend:
    """A local tier whose engine runs in a child process that is restarted when it dies."""

    is_local = True

    def __init__(self, tier: TierSettings, settings: Settings, *, health_interval_s: float = 0.25) -> None:
        self.name = tier.name
        self.kind = tier.kind
        self._tier = tier
        self._settings = settings.model_copy(update={"engine_isolation": "thread"})
        self._health_interval_s = health_interval_s
        self._mp = multiprocessing.get_context("spawn")
        self._ids = itertools.count()
        self._calls: dict[int, _Call] = {}
        self._send_lock = threading.Lock()
        self._pipes: _Pipes | None = None
        self._owner: asyncio.AbstractEventLoop | None = None  # the loop that reads the events pipe (read_on)
        self._loop_reader: _LoopReader | None = None  # its reader, while registered there
        self._wake_r, self._wake_w = os.pipe()  # tells the supervisor's reader that a loop takes the pipe over
        os.set_blocking(self._wake_w, False)
        self._proc: BaseProcess | None = None
        self._health: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self.state = "starting"  # up | restarting | closed
        self.restarts = 0
        self.crashes = 0
        self.last_crash: str | None = None
        self._closing = threading.Event()
        self._cpu = EngineCpu()
        conn, proc, info = self._spawn()  # the first start fails loudly, like an in-process load
        self._attach(conn, proc, info)
        self._supervisor = threading.Thread(target=self._supervise, name=f"engine-supervisor-{self.name}",
                                            daemon=True)
        self._supervisor.start()

    # ---- process life ----

    def _spawn(self) -> tuple[_Pipes, BaseProcess, dict[str, Any]]:
        """Start an engine process and wait until its model is loaded (or its load failed)."""
        requests_in, requests_out = self._mp.Pipe(duplex=False)
        parent, events_out = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(target=_child_main, name=f"localroute-engine-{self.name}",
                                args=(requests_in, events_out, self._tier, self._settings, self._health_interval_s),
                                daemon=True)
        proc.start()
        requests_in.close()  # only the child holds its ends now: its death closes the events pipe
        events_out.close()
        timeout = self._settings.engine_start_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not parent.poll(left):
                    raise BackendUnavailableError(f"local tier {self.name}: engine did not start within {timeout:g}s")
                batch = parent.recv()
            except (EOFError, OSError):
                proc.join(5)
                parent.close()
                requests_out.close()
                raise EngineDeadError(f"local tier {self.name}: engine process died while loading "
                                      f"({_exit_reason(proc)})") from None
            except BackendUnavailableError:
                proc.kill()
                proc.join(5)
                parent.close()
                requests_out.close()
                raise
            for event in batch:
                if event[0] == "ready":
                    return _Pipes(parent, requests_out), proc, event[1]
                if event[0] == "failed":
                    proc.join(5)
                    parent.close()
                    requests_out.close()
                    raise _rebuild(event[1])
                if event[0] == "health":
                    self._health = event[1]

    def _attach(self, pipes: _Pipes, proc: BaseProcess, info: dict[str, Any]) -> None:
        if proc.pid is not None:
            self._cpu.attach(proc.pid)
        self._pipes, self._proc, self._info = pipes, proc, info
        self.state = "up"

    def _supervise(self) -> None:
        """Read the child's events until its pipe closes; then fail what was in flight and restart."""
        backoff = self._settings.engine_restart_backoff_s
        while not self._closing.is_set():
            pipes, proc = self._pipes, self._proc
            assert pipes is not None and proc is not None
            up_since = time.monotonic()
            self._read_until_closed(pipes, proc)
            self._cpu.retire()  # its last reading, while it can still be read (before it is reaped)
            proc.join(5)
            if self._closing.is_set():
                return
            reason = _exit_reason(proc)
            self.crashes += 1
            self.last_crash = reason
            self.state = "restarting"
            if time.monotonic() - up_since > 60:  # it ran a while: start again from the shortest wait
                backoff = self._settings.engine_restart_backoff_s
            log.error("local tier %s: engine process %s %s; %d request(s) failed; restarting in %.1fs",
                      self.name, proc.pid, reason, len(self._calls), backoff)
            self._fail_all(EngineDeadError(f"local tier {self.name} is down: its engine {reason}; restarting",
                                           retry_after_s=backoff))
            pipes.requests.close()
            while not self._closing.wait(backoff):
                try:
                    new = self._spawn()
                except LocalrouteError as exc:
                    backoff = min(backoff * 2, self._settings.engine_restart_backoff_max_s)
                    log.error("local tier %s: engine restart failed (%s); next try in %.1fs", self.name,
                              exc.message, backoff)
                    continue
                if self._closing.is_set():
                    new[1].kill()
                    return
                self.restarts += 1
                self._attach(*new)
                log.warning("local tier %s: engine restarted (pid %s, restart %d)", self.name, new[1].pid,
                            self.restarts)
                backoff = min(backoff * 2, self._settings.engine_restart_backoff_max_s)
                break

    def _read_until_closed(self, pipes: _Pipes, proc: BaseProcess) -> None:
        """Until the events pipe closes: read it here, or hand it to the loop `read_on` named and wait."""
        while True:
            owner = self._owner
            if owner is None:
                if self._pump(pipes.events):
                    pipes.events.close()
                    return
                continue  # a loop takes the pipe over
            reader = _LoopReader(self, pipes.events, owner)
            try:
                owner.call_soon_threadsafe(reader.start)
            except RuntimeError:  # that loop is closed: read here again
                self._owner = None
                continue
            # the loop's reader closes the pipe itself, on its own thread, after taking it out of its
            # selector: closed from here, the fd could stay registered there and block the next pipe
            while not reader.lost.wait(0.5):
                if self._closing.is_set() and not proc.is_alive():
                    return  # closed while that loop no longer runs: nobody will see the end of the pipe
                if owner.is_closed():  # gone without closing this tier (a failed start-up, say):
                    log.error("local tier %s: the event loop reading its engine's pipe was closed; "
                              "restarting the engine, read by a thread from now on", self.name)
                    self._owner = None  # nobody reads the pipe any more: the engine is restarted
                    self._loop_reader = None
                    pipes.events.close()  # that loop's selector is closed with it: no entry is left
                    proc.kill()
                    return
            return

    def read_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let `loop` (the server's, running) read the events pipe from now on, for this backend's life.

        Answers then wake the serving loop directly: one thread hand-off less per request than the
        supervisor's reader thread, which hands each batch to the loop. The loop must outlive the
        calls made on it; `aclose` (the server's shutdown) ends it."""
        if self._closing.is_set():
            return
        self._owner = loop
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # already woken
            pass

    def _pump(self, conn: Connection) -> bool:
        """Read the child's event batches on this thread; True when the pipe closed, False when a
        loop takes it over (at a message boundary: `recv` reads whole messages)."""
        with selectors.DefaultSelector() as sel:
            sel.register(conn.fileno(), selectors.EVENT_READ, "events")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                if self._owner is not None:
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass
                    return False
                ready = sel.select()
                if any(key.data == "wake" for key, _ in ready):
                    if self._owner is None:
                        os.read(self._wake_r, 64)
                    continue
                try:
                    batch = conn.recv()
                except (EOFError, OSError):
                    return True
                self._dispatch(batch, None)

    def _dispatch(self, batch: list[Event], here: asyncio.AbstractEventLoop | None) -> None:
        """Hand the child's event batch to the waiting calls: directly to those waiting on `here` (the
        loop reading the pipe), with one wake-up per other loop."""
        calls = self._calls
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Event], None], Event]]] = {}
        for event in batch:
            if event[0] == "health":
                self._health = event[1]
                continue
            # a call's last event takes it out; pop, not get-then-del: the caller's own `finally`
            # (a cancel) may pop it in between, and a KeyError here would end the reader
            call = calls.get(event[1]) if event[0] == "delta" else calls.pop(event[1], None)
            if call is None:
                continue  # cancelled meanwhile
            if call.loop is here:
                call.put(event)
            else:
                per_loop.setdefault(call.loop, []).append((call.put, event))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is waiting
                pass

    def _fail_all(self, exc: EngineDeadError) -> None:
        spec = _spec(exc)
        doomed, self._calls = self._calls, {}
        for rid, call in list(doomed.items()):  # a loop's reader may still pop from it
            try:
                call.loop.call_soon_threadsafe(call.put, ("error", rid, spec))
            except RuntimeError:
                pass

    def _send(self, msg: tuple[Any, ...]) -> None:
        pipes = self._pipes
        if pipes is None:
            raise EngineDeadError(f"local tier {self.name} is down")
        with self._send_lock:
            pipes.requests.send(msg)

    # ---- the Backend contract ----

    def _submit(self, request: GenerationRequest, stream: bool, put: Callable[[Event], None]) -> int:
        """Send `request` to the engine; its events go to `put`, on the caller's loop. Its id."""
        if self.state != "up":
            raise EngineDeadError(f"local tier {self.name} is down ({self.state} after: {self.last_crash}); "
                                  "retry shortly", retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        owner = self._owner
        if owner is not None and owner is not loop and not owner.is_running():
            raise BackendUnavailableError(f"local tier {self.name}: the event loop that reads its engine's pipe "
                                          "is not running (only the loop given to read_on, or any loop while "
                                          "that one runs, can call this tier)")
        rid = next(self._ids)
        self._calls[rid] = _Call(loop, put)
        # without the client's body (a local engine renders messages; the body would only add
        # pickling), stamped as handed over: the pipe's hop is the engine's time, as waking an
        # in-process engine thread is
        request = replace(request, wire=None, native=None, handed_at=time.perf_counter())
        try:
            self._send(("submit", rid, request, stream))
        except (OSError, ValueError):
            self._calls.pop(rid, None)
            raise EngineDeadError(f"local tier {self.name} is down", retry_after_s=1.0) from None
        return rid

    def _forget(self, rid: int, finished: bool) -> None:
        """The caller is done with call `rid`: a call left unfinished (cancelled) is cancelled in the engine."""
        if self._calls.pop(rid, None) is not None and not finished and self.state == "up":
            try:
                self._send(("cancel", rid))
            except (OSError, ValueError, LocalrouteError):
                pass

    async def generate(self, request: GenerationRequest) -> Generation:
        # one event comes back ("done" or "error"): a future, not a queue and an async generator
        answer: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

        def put(event: Event) -> None:
            if not answer.done():
                answer.set_result(event)

        rid = self._submit(request, False, put)
        finished = False
        try:
            event = await answer
            finished = True
        finally:
            self._forget(rid, finished)
        if event[0] == "done":
            return _generation(event[2])
        if event[0] == "error":
            raise _rebuild(event[2])
        raise BackendUnavailableError("local engine ended without an answer")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        rid = self._submit(request, True, queue.put_nowait)
        finished = False
        try:
            while True:
                event = await queue.get()
                kind = event[0]
                if kind == "error":
                    finished = True
                    raise _rebuild(event[2])
                if kind == "delta":
                    wire = event[3]
                    yield StreamDelta(text=event[2], token=None if wire is None else _token(wire), index=event[4],
                                      finish_reason=event[5])
                else:
                    finished = True
                    yield StreamDelta(text="", final=_generation(event[2]))
                    return
        finally:
            self._forget(rid, finished)

    def health(self) -> dict[str, Any]:
        h = dict(self._health)
        h["ok"] = self.state == "up" and bool(h.get("ok", False))
        counters = dict(h.get("counters") or {})
        counters["restarts_total"] = self.restarts
        counters["crashes_total"] = self.crashes
        h["counters"] = counters
        h["engine_process"] = {"pid": self._proc.pid if self._proc else None, "state": self.state,
                               "restarts": self.restarts, "crashes": self.crashes, "last_crash": self.last_crash,
                               "gc_frozen": self._info.get("gc_frozen"), "pipe_reader": self.pipe_reader}
        if self.state != "up":
            h["error"] = f"engine {self.state} after: {self.last_crash}"
        return h

    @property
    def pipe_reader(self) -> str:
        """Who reads the engine's answers: "loop" (the serving loop, after `read_on`) or "thread"."""
        return "loop" if self._loop_reader is not None else "thread"

    def engine_cpu_s(self) -> float:
        """CPU seconds this tier's engine processes have used (EngineCpu). The engine's work is not in
        the server's own process_time(): the telemetry's CPU clock adds this to it, so a local answer
        is priced at the CPU its engine used (service.cpu_clock)."""
        return self._cpu.total()

    @property
    def pid(self) -> int | None:
        """The engine process (tests kill it to prove a crash is survived)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def uses_gpu(self) -> bool | None:
        flag = self._info.get("uses_gpu")
        return None if flag is None else bool(flag)

    @property
    def model(self) -> str:
        return str(self._info.get("model") or self._tier.model or "")

    @property
    def capabilities(self) -> Capabilities:
        """The engine's, as it reported them from its process (its kind's defaults before that)."""
        own = self._info.get("capabilities")
        return own if isinstance(own, Capabilities) else default_capabilities(self.kind, True)

    def fingerprint(self) -> dict[str, Any]:
        """The engine's model-file hash and chat template (calibration.backend_fingerprint)."""
        return dict(self._info.get("fingerprint") or {})

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        if self._closing.is_set():
            return  # closed already (its wake pipe's fd numbers may belong to someone else by now)
        self._closing.set()
        self.state = "closed"
        proc = self._proc
        try:
            self._send(("close",))
        except (OSError, ValueError, LocalrouteError):
            pass
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._fail_all(EngineDeadError(f"local tier {self.name} closed"))
        self._supervisor.join(2)  # it closes the events pipe (or the loop's reader does)
        if self._pipes is not None:
            self._pipes.requests.close()
        if not self._supervisor.is_alive():  # else it may still select on the wake pipe: leave it
            os.close(self._wake_r)
            os.close(self._wake_w)


def supervised(tier: TierSettings, settings: Settings, load: Callable[[TierSettings, Settings], Backend]) -> Backend:
    """The tier's backend, in a supervised process where its kind runs native code in-process."""
    if settings.engine_isolation == "process" and tier.kind in ISOLATED_KINDS:
        return SupervisedBackend(tier, settings)
    return load(tier, settings)
