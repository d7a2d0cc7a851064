"""Every scripted stand-in of the test suite, in one place: a backend for unit tests of routing
and server logic (never the only test of a real backend), a thread-driven engine for the engine
process's own logic (backends/engine_child), and stand-ins for the `pynvml` module.
Real components run elsewhere: the engines in test_llama_cpp / test_backend_contract, NVML on a
GPU host (test_telemetry's real-pynvml test)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

from localroute.backends.capabilities import default_capabilities
from localroute.backends.decoding import DecodeState
from localroute.backends.threaded import EngineBridge
from localroute.calibration_file import model_fingerprint
from localroute.types import (
    FinishReason,
    Generation,
    GenerationRequest,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)


def tokens(logprobs: float | Sequence[float], text: str = "ok") -> list[TokenLogprob]:
    """Tokens whose texts concatenate to `text`. A list of logprobs: one token per logprob, the
    text split evenly; one logprob: one token per word (the space before a word belongs to it),
    all at that logprob. Each token heads its own top list, a runner-up 1 nat below."""
    if isinstance(logprobs, (int, float)):
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        lps = [float(logprobs)] * len(pieces)
    else:
        lps = list(logprobs)
        n = len(lps)
        step = max(1, len(text) // max(n, 1))
        pieces = [text[i * step : (i + 1) * step] for i in range(n - 1)] + [text[(n - 1) * step :]] if n else []
    return [
        TokenLogprob(i, p, lp, tuple(p.encode()), (TopLogprob(p, lp), TopLogprob("x", lp - 1.0)))
        for i, (p, lp) in enumerate(zip(pieces, lps, strict=True))
    ]


class ScriptedBackend:
    """A fast fake tier implementing the Backend protocol: answers `text` with the tokens
    `tokens(logprobs, text)` makes (cut at the request's max_tokens, finish_reason "length"), or
    raises `error`. It counts calls; health() says it is up unless it is scripted to fail
    (`ok` can be set), with the `kind` and `device` given (what the cost ledger reads)."""

    def __init__(self, name: str = "fake", text: str = "ok fine", logprobs: float | Sequence[float] = -0.1, *,
                 local: bool = True, error: Exception | None = None, prompt_tokens: int = 5,
                 kind: str = "scripted", device: str | None = None, uses_gpu: bool | None = None) -> None:
        self.name = name
        self.is_local = local
        self.text = text
        self.logprobs = logprobs
        self.error = error
        self.prompt_tokens = prompt_tokens
        self.kind = kind
        self.device = device
        self.uses_gpu = uses_gpu  # None: the cost ledger decides from health(), as for a real backend
        self.model = name
        self.capabilities = default_capabilities(kind, local)
        self.ok = error is None
        self.calls = 0

    def _generation(self, request: GenerationRequest) -> Generation:
        toks = tokens(self.logprobs, self.text)
        finish: FinishReason = "stop"
        text = self.text
        if len(toks) > request.params.max_tokens:
            toks = toks[: request.params.max_tokens]
            text, finish = "".join(t.token for t in toks), "length"
        return Generation(text, toks, finish, self.prompt_tokens, len(toks), latency_s=0.01, ttft_s=0.005,
                          model=self.name)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self._generation(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        gen = await self.generate(request)
        for tok in gen.tokens:
            yield StreamDelta(text=tok.token, token=tok)
        yield StreamDelta(text="", final=gen)

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint(None, None, self.name)

    def health(self) -> dict[str, Any]:
        h: dict[str, Any] = {"ok": self.ok, "kind": self.kind, "model": self.name, "active": 0, "waiting": 0}
        if self.device is not None:
            h["device"] = self.device
        return h

    async def aclose(self) -> None:
        return None


class ScriptedEngine:
    """A thread-driven engine (backends.threaded.ThreadedEngine) with one slot: its thread admits
    the waiting jobs in turn and answers each from its last message's text, "ok fine" by default:
    "hold" keeps the slot until `release` is set, "unpicklable" answers a Generation the pipe
    cannot pickle, "unbuildable" one the pipe's format cannot encode. Like a real engine thread it
    does not survive an exception raised into it by a sink; `alive()` says whether it still runs.
    `submitted` holds each job's request_id and the monotonic time it was submitted."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.submitted: dict[str, float] = {}
        self._jobs: queue.SimpleQueue[DecodeState | None] = queue.SimpleQueue()  # None: stop
        self._thread = threading.Thread(target=self._loop, name="scripted-engine", daemon=True)
        self._thread.start()

    def submit(self, job: DecodeState) -> None:
        self.submitted[job.request_id] = time.monotonic()
        self._jobs.put(job)

    def cancel(self, job: DecodeState) -> None:
        job.cancelled = True  # a waiting job is skipped when its turn comes

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._jobs.put(None)
        self.release.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled:
                continue
            job.sink(("admitted", None))
            job.sink(("done", self._answer(job)))

    def _answer(self, job: DecodeState) -> Generation:
        script = job.extra["script"]
        if script == "hold":
            self.release.wait()
        toks = tokens(-0.1, "ok fine")
        gen = Generation("ok fine", toks, "stop", len(job.prompt), len(toks), model="scripted")
        if script == "unpicklable":
            gen.extra["lock"] = threading.Lock()
        elif script == "unbuildable":
            gen.tokens = [None]  # type: ignore[list-item]
        return gen


class ScriptedEngineBridge(EngineBridge):
    """A local backend over a ScriptedEngine, through the real EngineBridge request set-up (its
    `direct_job` is what the engine process submits itself). A request whose last message is
    "slow" takes `slow_s` to tokenise (the chat template and tokenising of a long prompt)."""

    kind = "scripted"
    engine: ScriptedEngine

    def __init__(self, queue_timeout_s: float = 5.0, slow_s: float = 0.0) -> None:
        self.name = "scripted-engine"
        self.engine = ScriptedEngine()
        self.queue_timeout_s = queue_timeout_s
        self.slow_s = slow_s

    @property
    def context_tokens(self) -> int:
        return 1024

    @staticmethod
    def script(request: GenerationRequest) -> str:
        return str(request.messages[-1]["content"]) if request.messages else ""

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        text = self.script(request)
        if text == "slow":
            time.sleep(self.slow_s)
        return list(range(1, len(text.split()) + 2))

    def _state(self, request: GenerationRequest, **common: Any) -> DecodeState:
        return DecodeState(**common, extra={"script": self.script(request)})

    def health(self) -> dict[str, Any]:
        return {"ok": self.engine.alive(), "kind": self.kind}

    async def aclose(self) -> None:
        self.engine.close()


class FakeNvml:
    """Two devices shaped like pynvml's: device 1 has no energy counter (power x time fallback)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self) -> None:
        self.energy_mj = [1_000_000, 0]
        self.power_mw = [150_000, 80_000]
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        return None

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54"

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H200" if h == 0 else b"Tesla T4"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=37 if h == 0 else 5, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self.power_mw[h]

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.energy_mj[h]


class BrokenNvml:
    """pynvml on a host without the NVIDIA library: nvmlInit fails."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")
