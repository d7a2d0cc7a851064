"""The CPU an engine process uses, read from the server: local answers are priced at it.

With `engine_isolation = "process"` (the default) a local engine's work is in its own process, not
in the server's process_time(); `service.cpu_clock` adds every tier's `EngineCpu.total()` to it.
"""

from __future__ import annotations

import sys
import threading
import time


def process_cpu_s(pid: int) -> float | None:
    """CPU time (user + system, every thread) of another process in seconds, or None where it cannot
    be read (the process is gone and reaped; no way to read it on this OS). On Linux the process's
    own CPU-time clock, which clock_getcpuclockid(3) names (CPUCLOCK_SCHED, process-wide: ~pid << 3
    | 2): the scheduler's runtime in nanoseconds (a thread running right now counts up to its last
    scheduler tick); /proc's utime + stime count 10 ms clock ticks. Elsewhere psutil's reading,
    where psutil is installed."""
    if sys.platform.startswith("linux"):
        try:
            return time.clock_gettime(((~pid) << 3) | 2)
        except OSError:
            return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


class EngineCpu:
    """The CPU seconds of a tier's engine processes, one after another: the current one's since it
    was attached, plus every earlier one's last reading. The first engine's start-up counts (it is
    over before any answer is priced); a restarted engine's does not: its model load is no answer's
    cost, and priced by interpolation it landed on the first answers after the restart (1.4 s of CPU
    in a 0.2 s window). Read from the serving loop (pricing) and the telemetry thread: each reading
    is taken under the lock, so one process's readings never go backwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None  # the engine read now (None: none, or the last one retired)
        self._attached = False
        self._offset: float | None = 0.0  # its clock when it was attached (0 for the first engine)
        self._base = 0.0  # the earlier engines' CPU seconds
        self._last = 0.0  # the current one's since it was attached, as last read

    def attach(self, pid: int) -> None:
        with self._lock:
            self._read()
            self._base += self._last
            self._last = 0.0
            # a restart's clock now; None (unreadable for a moment): its first reading then
            self._offset = process_cpu_s(pid) if self._attached else 0.0
            self._pid, self._attached = pid, True

    def retire(self) -> None:
        """The current engine is gone (about to be reaped, after which its pid may be another
        process's): its last reading is kept, and it is read no more."""
        with self._lock:
            self._read()
            self._pid = None

    def total(self) -> float:
        with self._lock:
            self._read()
            return self._base + self._last

    def _read(self) -> None:
        if self._pid is not None and (now := process_cpu_s(self._pid)) is not None:
            if self._offset is None:
                self._offset = now
            self._last = max(self._last, now - self._offset)
