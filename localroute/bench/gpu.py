"""GPU readings while a load runs: NVML (localroute.monitoring.telemetry.Nvml) sampled by a thread, summarised
as utilisation, memory, power and the energy the devices used over the window.

Used by `localroute bench` for every level when NVML sees a GPU, and by scripts/gpu_check.py. Where
there is none, `Nvml.available` is False with its reason and no sampler runs. Only the GPUs that
CUDA_VISIBLE_DEVICES names (as indices) are counted when it is set.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Self

from localroute.monitoring.telemetry import GpuReading, Nvml


def visible_gpus(env: str | None = None) -> frozenset[int] | None:
    """The NVML indices CUDA_VISIBLE_DEVICES names (None: all; also for UUID lists, which would
    need a lookup), so a level is not charged for other jobs' GPUs on a shared host."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env
    if not value or not value.strip():
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return frozenset(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


class GpuSampler(threading.Thread):
    """NVML readings of the visible GPUs each `interval_s` until stopped (also a context manager)."""

    def __init__(self, nvml: Nvml, interval_s: float = 0.2, devices: frozenset[int] | None = None) -> None:
        super().__init__(daemon=True, name="gpu-sampler")
        self.nvml, self.interval_s = nvml, interval_s
        self.devices = visible_gpus() if devices is None else devices
        self.rows: list[tuple[float, list[GpuReading]]] = []
        self._stop_event = threading.Event()

    def _read(self) -> None:
        readings = [r for r in self.nvml.read() if self.devices is None or r.index in self.devices]
        if readings:
            self.rows.append((time.perf_counter(), readings))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._read()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self._read()  # a last reading, so even a short window has two

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> dict[str, Any]:
        """Utilisation mean/max over samples (the busiest device at each instant), GPU-seconds
        (mean utilisation x window), peak memory, mean/max power (summed over devices) and energy
        (the counters' increase, summed over devices; None without two readings)."""
        util = [max(u) for _, rs in self.rows if (u := [r.utilization_ratio for r in rs
                                                         if r.utilization_ratio is not None])]
        power = [sum(p) for _, rs in self.rows if (p := [r.power_w for r in rs if r.power_w is not None])]
        mem = [sum(m) for _, rs in self.rows if (m := [r.memory_used_bytes for r in rs
                                                       if r.memory_used_bytes is not None])]
        window = self.rows[-1][0] - self.rows[0][0] if len(self.rows) > 1 else 0.0
        energy: float | None = None
        if len(self.rows) > 1:
            first = {r.index: r.energy_j for r in self.rows[0][1] if r.energy_j is not None}
            last = {r.index: r.energy_j for r in self.rows[-1][1] if r.energy_j is not None}
            common = first.keys() & last.keys()
            energy = sum(last[i] - first[i] for i in common) if common else None
        first_readings = self.rows[0][1] if self.rows else []
        return {
            "samples": len(self.rows),
            "window_s": round(window, 3),
            "gpu_util_mean": round(statistics.fmean(util), 3) if util else None,
            "gpu_util_max": round(max(util), 3) if util else None,
            "gpu_seconds": round(statistics.fmean(util) * window, 3) if util else None,
            "memory_used_max_bytes": max(mem) if mem else None,
            "memory_total_bytes": sum(r.memory_total_bytes or 0 for r in first_readings) or None,
            "power_w_mean": round(statistics.fmean(power), 1) if power else None,
            "power_w_max": round(max(power), 1) if power else None,
            "energy_j": round(energy, 3) if energy is not None else None,
            "energy_method": first_readings[0].energy_method if first_readings else None,
        }
