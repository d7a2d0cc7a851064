"""A local engine in a supervised child process: its crash is a tier that is down, never a dead server.

This module is the parent's (server's) side: `SupervisedBackend` spawns, reads and restarts the
engine process. The child's side is backends/engine_child.py, the pipe's format backends/engine_wire.py.

llama.cpp and torch run native code; a fault there (a SIGSEGV in a CPU kernel, an abort in a CUDA
driver) kills whatever process holds them. vLLM's AsyncLLM keeps EngineCore in a child process for
the same reason; here each thread-driven local tier (llama.cpp, transformers) runs in its own
`spawn`ed process and the server talks to it over one pipe:

    parent (server)                          child (one per local tier)
    SupervisedBackend.generate/stream  --->  ("submit", id, request, stream) -> the real backend
    reader thread  <--- lists of events ---  ("delta" | "done" | "error", id, ...), ("health", {...})

A child's events are sent in batches, one pipe write per event-loop pass (a whole engine step's
tokens for every request together), so the per-token path gains one pickle and one pipe hop, not a
thread hand-off per token; tokens and answers cross as tuples of primitives (TokenWire,
GenerationWire), rebuilt into dataclasses by the waiting caller. When the child dies, the reader
thread sees the pipe close: every call in flight ends with `EngineDeadError` (the cascade escalates
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
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from localroute.backends.capabilities import Capabilities, default_capabilities
from localroute.backends.engine_child import _child_main
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
    queue: asyncio.Queue[Event]


def _deliver(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


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
        self._conn: Connection | None = None
        self._proc: BaseProcess | None = None
        self._health: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self.state = "starting"  # up | restarting | closed
        self.restarts = 0
        self.crashes = 0
        self.last_crash: str | None = None
        self._closing = threading.Event()
        conn, proc, info = self._spawn()  # the first start fails loudly, like an in-process load
        self._attach(conn, proc, info)
        self._supervisor = threading.Thread(target=self._supervise, name=f"engine-supervisor-{self.name}",
                                            daemon=True)
        self._supervisor.start()

    # ---- process life ----

    def _spawn(self) -> tuple[Connection, BaseProcess, dict[str, Any]]:
        """Start an engine process and wait until its model is loaded (or its load failed)."""
        parent, child = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_child_main, name=f"localroute-engine-{self.name}",
                                args=(child, self._tier, self._settings, self._health_interval_s), daemon=True)
        proc.start()
        child.close()  # only the child holds its end now: its death closes the pipe
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
                raise EngineDeadError(f"local tier {self.name}: engine process died while loading "
                                      f"({_exit_reason(proc)})") from None
            except BackendUnavailableError:
                proc.kill()
                proc.join(5)
                parent.close()
                raise
            for event in batch:
                if event[0] == "ready":
                    return parent, proc, event[1]
                if event[0] == "failed":
                    proc.join(5)
                    parent.close()
                    raise _rebuild(event[1])
                if event[0] == "health":
                    self._health = event[1]

    def _attach(self, conn: Connection, proc: BaseProcess, info: dict[str, Any]) -> None:
        self._conn, self._proc, self._info = conn, proc, info
        self.state = "up"

    def _supervise(self) -> None:
        """Read the child's events until its pipe closes; then fail what was in flight and restart."""
        backoff = self._settings.engine_restart_backoff_s
        while not self._closing.is_set():
            conn, proc = self._conn, self._proc
            assert conn is not None and proc is not None
            up_since = time.monotonic()
            self._pump(conn)
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
            conn.close()
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

    def _pump(self, conn: Connection) -> None:
        """Hand the child's event batches to the waiting calls' loops, one wake-up per loop per batch."""
        calls = self._calls
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                return
            per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
            for event in batch:
                if event[0] == "health":
                    self._health = event[1]
                    continue
                # a call's last event takes it out; pop, not get-then-del: the caller's own `finally`
                # (a cancel) may pop it in between, and a KeyError here would end this reader thread
                call = calls.get(event[1]) if event[0] == "delta" else calls.pop(event[1], None)
                if call is None:
                    continue  # cancelled meanwhile
                per_loop.setdefault(call.loop, []).append((call.queue, event))
            for loop, items in per_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that loop is closed: nobody is waiting
                    pass

    def _fail_all(self, exc: EngineDeadError) -> None:
        spec = _spec(exc)
        doomed, self._calls = self._calls, {}
        for rid, call in doomed.items():
            try:
                call.loop.call_soon_threadsafe(call.queue.put_nowait, ("error", rid, spec))
            except RuntimeError:
                pass

    def _send(self, msg: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise EngineDeadError(f"local tier {self.name} is down")
        with self._send_lock:
            conn.send(msg)

    # ---- the Backend contract ----

    async def _events(self, request: GenerationRequest, stream: bool) -> AsyncIterator[Event]:
        if self.state != "up":
            raise EngineDeadError(f"local tier {self.name} is down ({self.state} after: {self.last_crash}); "
                                  "retry shortly", retry_after_s=1.0)
        rid = next(self._ids)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._calls[rid] = _Call(asyncio.get_running_loop(), queue)
        finished = False
        try:
            try:
                self._send(("submit", rid, request, stream))
            except (OSError, ValueError):
                raise EngineDeadError(f"local tier {self.name} is down", retry_after_s=1.0) from None
            while True:
                event = await queue.get()
                if event[0] == "error":
                    finished = True
                    raise _rebuild(event[2])
                finished = event[0] == "done"
                yield event
                if finished:
                    return
        finally:
            if self._calls.pop(rid, None) is not None and not finished and self.state == "up":
                try:
                    self._send(("cancel", rid))
                except (OSError, ValueError, LocalrouteError):
                    pass

    async def generate(self, request: GenerationRequest) -> Generation:
        async for event in self._events(request, stream=False):
            if event[0] == "done":
                return _generation(event[2])
        raise BackendUnavailableError("local engine ended without an answer")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        async for event in self._events(request, stream=True):
            if event[0] == "delta":
                wire = event[3]
                yield StreamDelta(text=event[2], token=None if wire is None else _token(wire), index=event[4],
                                  finish_reason=event[5])
            else:
                yield StreamDelta(text="", final=_generation(event[2]))

    def health(self) -> dict[str, Any]:
        h = dict(self._health)
        h["ok"] = self.state == "up" and bool(h.get("ok", False))
        counters = dict(h.get("counters") or {})
        counters["restarts_total"] = self.restarts
        counters["crashes_total"] = self.crashes
        h["counters"] = counters
        h["engine_process"] = {"pid": self._proc.pid if self._proc else None, "state": self.state,
                               "restarts": self.restarts, "crashes": self.crashes, "last_crash": self.last_crash,
                               "gc_frozen": self._info.get("gc_frozen")}
        if self.state != "up":
            h["error"] = f"engine {self.state} after: {self.last_crash}"
        return h

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
        if self._conn is not None:
            self._conn.close()


def supervised(tier: TierSettings, settings: Settings, load: Callable[[TierSettings, Settings], Backend]) -> Backend:
    """The tier's backend, in a supervised process where its kind runs native code in-process."""
    if settings.engine_isolation == "process" and tier.kind in ISOLATED_KINDS:
        return SupervisedBackend(tier, settings)
    return load(tier, settings)
