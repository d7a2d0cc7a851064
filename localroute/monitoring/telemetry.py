"""Hardware telemetry: NVML (GPU utilisation, memory, power, energy), CPU time (the server's and its
engine processes'), CPU energy (RAPL) where readable, and how many sequences the local engines are
decoding.

A background thread samples all of it every `interval_s` into a short history; the cost ledger
asks for what one request's time window consumed (`Telemetry.window`). NVML is imported lazily
(`nvidia-ml-py`, module `pynvml`); with no driver, no library or an unsupported call, GPU telemetry
reads "unavailable" with the reason, and everything else keeps working.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["GpuReading", "Nvml", "Sample", "Telemetry", "Usage", "cpu_info", "read_cpu_energy_j"]

RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One device at one instant. None: the device does not support that reading."""

    index: int
    name: str
    utilization_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    power_w: float | None
    energy_j: float | None  # cumulative since driver load (or integrated power when unsupported)
    energy_method: str = "nvml_total_energy"


class Nvml:
    """Lazy NVML access. `module` may be a stand-in object for tests; otherwise `pynvml` is imported
    on first use. Every failure turns into `available = False` with a `reason`, never an exception."""

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        self._module = module
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._started = False
        self.available = False
        self.reason: str | None = None
        self.driver_version: str | None = None
        # power x time integration for devices without an energy counter: index -> (t, joules, last W)
        self._integrated: dict[int, tuple[float, float, float]] = {}

    @property
    def _error_type(self) -> type[BaseException]:
        err = getattr(self._module, "NVMLError", None)
        return err if isinstance(err, type) and issubclass(err, BaseException) else Exception

    def start(self) -> bool:
        """Initialise once; True when at least one device can be read."""
        if self._started:
            return self.available
        self._started = True
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError:
                self.reason = "nvidia-ml-py is not installed (pip install 'localroute[gpu]')"
                return False
        nv = self._module
        try:
            nv.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / anything odd
            self.reason = f"NVML unavailable: {_describe(exc)}"
            return False
        try:
            count = int(nv.nvmlDeviceGetCount())
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._names = [_text(nv.nvmlDeviceGetName(h)) for h in self._handles]
            try:
                self.driver_version = _text(nv.nvmlSystemGetDriverVersion())
            except Exception:
                self.driver_version = None
        except Exception as exc:
            self.reason = f"NVML device query failed: {_describe(exc)}"
            self._shutdown()
            return False
        if not self._handles:
            self.reason = "NVML found no NVIDIA GPU"
            self._shutdown()
            return False
        self.available = True
        return True

    def devices(self) -> list[dict[str, Any]]:
        return [{"index": i, "name": n} for i, n in enumerate(self._names)]

    def read(self) -> list[GpuReading]:
        """Every device now; a call a device does not support gives None for that field."""
        if not self.start():
            return []
        nv: Any = self._module
        err = self._error_type
        out = []
        now = time.perf_counter()
        for i, h in enumerate(self._handles):
            rates = _try(nv.nvmlDeviceGetUtilizationRates, h, err)
            util = None if rates is None else rates.gpu / 100.0
            mem = _try(nv.nvmlDeviceGetMemoryInfo, h, err)
            power_mw = _try(nv.nvmlDeviceGetPowerUsage, h, err)
            energy_mj = _try(nv.nvmlDeviceGetTotalEnergyConsumption, h, err)
            power_w = None if power_mw is None else float(power_mw) / 1000.0
            method = "nvml_total_energy"
            if energy_mj is not None:
                energy_j: float | None = float(energy_mj) / 1000.0
            elif power_w is not None:  # fall back to power x time, integrated between our samples
                method = "nvml_power_x_time"
                t_prev, acc, w_prev = self._integrated.get(i, (now, 0.0, power_w))
                acc += 0.5 * (w_prev + power_w) * (now - t_prev)
                self._integrated[i] = (now, acc, power_w)
                energy_j = acc
            else:
                energy_j, method = None, "unavailable"
            out.append(GpuReading(
                index=i,
                name=self._names[i],
                utilization_ratio=None if util is None else float(util),
                memory_used_bytes=None if mem is None else int(mem.used),
                memory_total_bytes=None if mem is None else int(mem.total),
                power_w=power_w,
                energy_j=energy_j,
                energy_method=method,
            ))
        return out

    def _shutdown(self) -> None:
        nv: Any = self._module
        try:
            nv.nvmlShutdown()
        except Exception:
            pass

    def close(self) -> None:
        if self.available:
            self._shutdown()
        self.available = False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _try(fn: Callable[[Any], Any], handle: Any, err: type[BaseException]) -> Any:
    try:
        return fn(handle)
    except err:
        return None
    except Exception:  # a stand-in or an odd driver raising something else: still "unsupported"
        return None


def read_cpu_energy_j() -> float | None:
    """Package energy from Linux RAPL (powercap) in joules, or None where it is absent or unreadable
    (containers and non-root users usually cannot read it)."""
    if not RAPL_ROOT.is_dir():
        return None
    total, found = 0.0, False
    for zone in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if zone.name.count(":") != 1:  # sub-zones (core, uncore) are inside the package figure
            continue
        try:
            total += int((zone / "energy_uj").read_text()) / 1e6
            found = True
        except (OSError, ValueError):
            return None
    return total if found else None


def cpu_info() -> dict[str, Any]:
    """Cores this process may use, logical cores, and the CPU model name."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"usable_cores": usable, "logical_cores": os.cpu_count(), "model": model or "unknown",
            "machine": platform.machine()}


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters at time t (perf_counter). `active_*` is only set by periodic samples."""

    t: float
    cpu_s: float
    cpu_energy_j: float | None = None
    gpu_energy_j: float | None = None
    active_cpu: int | None = None
    active_gpu: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """What the server consumed over a window (`cpu_s`: its own process and its engine processes'),
    and how many sequences shared it."""

    wall_s: float
    cpu_s: float
    cpu_energy_j: float | None
    gpu_energy_j: float | None
    mean_active_cpu: float
    mean_active_gpu: float
    inputs: dict[str, Any] = field(default_factory=dict)


LoadFn = Callable[[], tuple[int, int]]


class Telemetry:
    """The background sampler. `load` returns (sequences active on CPU engines, on GPU engines)."""

    def __init__(self, interval_s: float = 0.25, nvml: Nvml | None = None, load: LoadFn | None = None,
                 history: int = 4096, cpu_energy: Callable[[], float | None] = read_cpu_energy_j,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        """`cpu_clock`: cumulative CPU seconds of everything the local engines run in (the server
        process, plus its engine processes where engines run in their own: service.cpu_clock)."""
        self.interval_s = interval_s
        self._cpu_clock = cpu_clock
        self.nvml = nvml if nvml is not None else Nvml()
        self.load = load
        self._cpu_energy = cpu_energy
        self._samples: deque[Sample] = deque(maxlen=history)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus: list[GpuReading] = []
        self._cpu_energy_ok = True
        self._last_is_reading = False  # whether the history's newest sample is a reading (not kept for long)

    # ---- lifecycle ----

    def start(self) -> None:
        if self._thread is not None:
            return
        self.nvml.start()
        self.sample(periodic=True)
        self._thread = threading.Thread(target=self._run, name="localroute-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.nvml.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample(periodic=True)
            except Exception:  # telemetry must never take the server down
                log.exception("telemetry sample failed")

    # ---- sampling ----

    def sample(self, periodic: bool = False) -> Sample:
        """Read every counter now and keep the reading in the history (the sampler thread's; a
        non-periodic one carries no load figure)."""
        return self._read(periodic, keep=True)

    def reading(self) -> Sample:
        """Every counter now, not kept yet: a priced request's window end (`window(..., end=)`),
        then `keep`. It carries no load figure: the finished request has left the engine."""
        return self._read(False, keep=False)

    def keep(self, reading: Sample) -> None:
        """Keep a priced request's reading (after its windows): it sharpens the start of the next
        request's window. The history holds only the newest one since the last periodic sample.
        Kept one per answer, readings crowded the history (4096 of them: 40 s at 100 answers/s,
        after which a longer request's window lost its start and was priced too low), and every
        window scanned all those taken during it (`scripts/bench_overhead.py`, 1-s answers priced
        back to back: 0.387 ms each, 0.013 ms with this)."""
        with self._lock:
            if self._samples and reading.t <= self._samples[-1].t:
                return  # a newer sample is kept already
            if self._last_is_reading and self._samples:
                self._samples[-1] = reading
            else:
                self._samples.append(reading)
            self._last_is_reading = True

    def _read(self, periodic: bool, keep: bool) -> Sample:
        gpus = self.nvml.read() if self.nvml.available else []
        gpu_energy = sum(g.energy_j for g in gpus if g.energy_j is not None) if gpus else None
        cpu_energy = self._cpu_energy() if self._cpu_energy_ok else None
        if cpu_energy is None:
            self._cpu_energy_ok = False
        active_cpu = active_gpu = None
        if periodic and self.load is not None:
            try:
                active_cpu, active_gpu = self.load()
            except Exception:
                log.exception("engine load probe failed")
        with self._lock:  # the clock read with the time, in order: both ascend together in the history
            s = Sample(time.perf_counter(), self._cpu_clock(), cpu_energy, gpu_energy, active_cpu, active_gpu)
            if keep:
                self._samples.append(s)
                self._last_is_reading = False
            if gpus:
                self._gpus = gpus
        return s

    def gpus(self) -> list[GpuReading]:
        """The latest reading of every GPU (empty when unavailable)."""
        with self._lock:
            return list(self._gpus)

    def status(self) -> dict[str, Any]:
        return {
            "gpu": "available" if self.nvml.available else "unavailable",
            "gpu_reason": self.nvml.reason,
            "gpus": [asdict(g) for g in self.gpus()],
            "cpu_energy": "available" if self._cpu_energy_ok else "unavailable",
            "interval_s": self.interval_s,
        }

    # ---- windows ----

    def window(self, t0: float, t1: float, end: Sample | None = None) -> Usage:
        """Process-wide consumption over [t0, t1] (perf_counter), linearly interpolated between
        samples, with the time-weighted number of sequences the engines were decoding meanwhile.
        `end`: a `reading()` taken at or after t1, which sharpens the window's end."""
        with self._lock:  # newest first, back to a few samples before t0: not the whole history
            samples = []
            before = 0
            for sample in reversed(self._samples):
                samples.append(sample)
                before += sample.t < t0
                if before >= WINDOW_MARGIN:
                    break
        samples.reverse()
        if end is not None and not any(s is end for s in samples):  # kept already, or not (yet)
            bisect.insort(samples, end, key=lambda s: s.t)
        t1 = max(t1, t0)
        cpu = _delta(samples, t0, t1, lambda s: s.cpu_s) or 0.0
        return Usage(
            wall_s=t1 - t0,
            cpu_s=max(cpu, 0.0),
            cpu_energy_j=_delta(samples, t0, t1, lambda s: s.cpu_energy_j),
            gpu_energy_j=_delta(samples, t0, t1, lambda s: s.gpu_energy_j),
            mean_active_cpu=_mean_step(samples, t0, t1, lambda s: s.active_cpu),
            mean_active_gpu=_mean_step(samples, t0, t1, lambda s: s.active_gpu),
            inputs={"samples": sum(1 for s in samples if t0 <= s.t <= t1), "interval_s": self.interval_s},
        )


# Samples kept before a window's start: the interpolation needs the last reading before t0 (a few
# more in case some samples lack a field, e.g. a failed NVML read).
WINDOW_MARGIN = 8


def _value_at(samples: list[Sample], t: float, get: Callable[[Sample], float | None]) -> float | None:
    pts = [(s.t, v) for s in samples if (v := get(s)) is not None]
    if not pts:
        return None
    times = [p[0] for p in pts]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return pts[0][1]
    if i == len(pts):
        return pts[-1][1]
    (ta, va), (tb, vb) = pts[i - 1], pts[i]
    return va if tb == ta else va + (vb - va) * (t - ta) / (tb - ta)


def _delta(samples: list[Sample], t0: float, t1: float, get: Callable[[Sample], float | None]) -> float | None:
    a, b = _value_at(samples, t0, get), _value_at(samples, t1, get)
    if a is None or b is None or b < a:  # a counter reset (RAPL wrap, driver reload) is not a reading
        return None
    return b - a


def _mean_step(samples: list[Sample], t0: float, t1: float, get: Callable[[Sample], int | None]) -> float:
    """Time-weighted mean of a step function (each sample holds until the next); at least 1,
    because the request being priced was itself one of the sequences."""
    pts = [(s.t, float(n)) for s in samples if (n := get(s)) is not None]
    if not pts:
        return 1.0
    if t1 <= t0:
        before = [v for t, v in pts if t <= t0]
        return max(1.0, before[-1] if before else pts[0][1])
    total, prev_t = 0.0, t0
    cur: float | None = None
    for t, v in pts:
        if t <= t0:
            cur = v
            continue
        if t >= t1:
            break
        if cur is not None:
            total += cur * (t - prev_t)
        else:  # no reading before the window: the first one inside stands for its start
            total += v * (t - prev_t)
        prev_t, cur = t, v
    if cur is None:  # no reading before or inside the window: the next one after it
        after = [v for t, v in pts if t >= t1]
        cur = after[0] if after else pts[-1][1]
    total += cur * (t1 - prev_t)
    return max(1.0, total / (t1 - t0))


def _engine(module: str, dist: str | None = None) -> dict[str, Any]:
    """Whether an engine is importable, found without importing it (torch/vLLM take seconds)."""
    import importlib.metadata
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    version = None
    if found:
        try:
            version = importlib.metadata.version(dist or module)
        except importlib.metadata.PackageNotFoundError:
            version = None
    return {"importable": found, "version": version}


def environment(nvml: Nvml | None = None, extra_buffers: str = "auto") -> dict[str, Any]:
    """What `localroute doctor` reports: CPU, GPU via NVML, the engines installed, and the choice;
    with llama.cpp, the CPU features it reports and its extra-buffer choice (`extra_buffers` mode)."""
    nv = nvml if nvml is not None else Nvml()
    gpu_ok = nv.start()
    gpus = [asdict(g) for g in nv.read()] if gpu_ok else []
    nv.close()
    engines = {
        "llama_cpp": _engine("llama_cpp", "llama_cpp_python"),
        "vllm": _engine("vllm"),
        "torch": _engine("torch"),
        "transformers": _engine("transformers"),
        "nvidia_ml_py": _engine("pynvml", "nvidia-ml-py"),
    }
    use: dict[str, Any]
    if gpu_ok and engines["vllm"]["importable"]:
        use = {"engine": "vllm", "device": "cuda", "why": "an NVIDIA GPU and vLLM are present"}
    elif gpu_ok and engines["transformers"]["importable"] and engines["torch"]["importable"]:
        use = {"engine": "transformers", "device": "cuda", "why": "an NVIDIA GPU with torch+transformers; no vLLM"}
    elif engines["llama_cpp"]["importable"]:
        why = "no usable NVIDIA GPU" if not gpu_ok else "no GPU engine (vLLM/transformers) installed"
        use = {"engine": "llama_cpp", "device": "cpu", "why": f"{why}; llama.cpp runs on the CPU"}
    else:
        use = {"engine": None, "device": None,
               "why": "no local engine installed: pip install 'localroute[cpu]' (or '[gpu]' on a GPU host)"}
    return {
        "cpu": cpu_info(),
        "cpu_energy": "available (RAPL)" if read_cpu_energy_j() is not None else "unavailable",
        "gpu": {
            "nvml": "available" if gpu_ok else "unavailable",
            "reason": nv.reason,
            "driver_version": nv.driver_version,
            "devices": gpus,
        },
        "engines": engines,
        "would_use": use,
        "llama_cpp_cpu": llama_cpp_cpu(extra_buffers) if engines["llama_cpp"]["importable"] else None,
    }


def llama_cpp_cpu(extra_buffers: str) -> dict[str, Any]:
    """llama.cpp's CPU features and its extra-buffer choice; never raises (doctor runs in CI)."""
    from localroute.backends.cpu_features import report

    try:
        return report(extra_buffers)
    except Exception as exc:  # noqa: BLE001 - a report, not a check: say what failed
        return {"system_info": "", "amx_cpu_flags": [], "mode": extra_buffers, "use_extra_bufts": None,
                "reason": f"could not read llama.cpp's CPU features: {exc}"}
