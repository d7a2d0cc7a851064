"""A local engine in a supervised child process: its crash is a tier that is down, never a dead server.

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
import gc
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from localroute import errors
from localroute.backends.capabilities import Capabilities, default_capabilities
from localroute.errors import BackendUnavailableError, EngineDeadError, LocalrouteError
from localroute.types import (
    FinishReason,
    Generation,
    GenerationRequest,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from localroute.backends.base import Backend
    from localroute.settings import Settings, TierSettings

log = logging.getLogger(__name__)

# kinds whose engine runs native code in this process unless isolated (vLLM has its own engine process)
ISOLATED_KINDS = frozenset({"llama_cpp", "transformers"})

Event = tuple[Any, ...]
ErrorSpec = tuple[str, str, str | None, str | None, float | None]
# The per-token path's wire format: tokens and answers as tuples of primitives. A pickled dataclass
# costs a class lookup and a state dict on each side, per token and per top logprob; a 64-token
# answer with 5 top logprobs took ~5 ms to pickle and unpickle, as tuples ~1 ms with the rebuild.
TopWire = tuple[str, float, tuple[int, ...] | None]
TokenWire = tuple[int, str, float, tuple[int, ...] | None, tuple[TopWire, ...]]
# the last item: an n > 1 answer's other choices, as GenerationWire themselves
GenerationWire = tuple[str, list[TokenWire], FinishReason, int, int, float, float | None, str, dict[str, Any],
                       dict[str, Any] | None, list[Any]]


def _token_wire(tok: TokenLogprob) -> TokenWire:
    return (tok.token_id, tok.token, tok.logprob, tok.bytes,
            tuple([(t.token, t.logprob, t.bytes) for t in tok.top_logprobs]))


def _token(wire: TokenWire) -> TokenLogprob:
    token_id, text, logprob, raw, tops = wire
    return TokenLogprob(token_id, text, logprob, raw, tuple([TopLogprob(t, lp, b) for t, lp, b in tops]))


def _generation_wire(gen: Generation) -> GenerationWire:
    return (gen.text, [_token_wire(t) for t in gen.tokens], gen.finish_reason, gen.prompt_tokens,
            gen.completion_tokens, gen.latency_s, gen.ttft_s, gen.model, gen.extra, gen.raw,
            [_generation_wire(c) for c in gen.choices])


def _generation(wire: GenerationWire) -> Generation:
    text, tokens, reason, prompt_tokens, completion_tokens, latency_s, ttft_s, model, extra, raw, choices = wire
    return Generation(text, [_token(t) for t in tokens], reason, prompt_tokens, completion_tokens, latency_s,
                      ttft_s, model, extra, raw,  # raw: a local tool call's chat.completion
                      [_generation(c) for c in choices])


def _spec(exc: BaseException) -> ErrorSpec:
    """An exception as plain data: LocalrouteError subclasses are rebuilt by name in the parent."""
    if isinstance(exc, LocalrouteError):
        return type(exc).__name__, exc.message, exc.param, exc.code, exc.retry_after_s
    return "BackendUnavailableError", f"local engine error: {type(exc).__name__}: {exc}", None, None, 1.0


def _rebuild(spec: ErrorSpec) -> LocalrouteError:
    name, message, param, code, retry_after_s = spec
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, LocalrouteError)):
        cls = BackendUnavailableError
    exc = cls(message, param=param, retry_after_s=retry_after_s)
    if code is not None:
        exc.code = code
    return exc


# ---------------------------------------------------------------- child


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

    def __init__(self, conn: Connection, backend: Backend, health_interval_s: float) -> None:
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

    def _read(self) -> None:
        """Reader thread: the parent's messages onto the loop (or, for a direct request, onto the
        engine); it also times out direct requests still waiting for a slot. A closed pipe means the
        parent is gone."""
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
            self.send([("error", rid, _spec(exc))])
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
            self.send([("error", rid, _spec(busy))])

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


def _child_main(conn: Connection, tier: TierSettings, settings: Settings, health_interval_s: float) -> None:
    """Entry point of the engine process (spawned: a fresh interpreter, no inherited threads)."""
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


# ---------------------------------------------------------------- parent


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
                call = calls.get(event[1])
                if call is None:
                    continue  # cancelled meanwhile
                if event[0] != "delta":
                    del calls[event[1]]
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
