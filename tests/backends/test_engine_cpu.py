"""The CPU of engine processes, read from the server (backends/engine_cpu.py): real child processes
that burn known amounts of CPU."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from localroute.backends.engine_cpu import EngineCpu, process_cpu_s


def test_process_cpu_s_reads_another_process_and_none_once_it_is_gone() -> None:
    """The engine process's CPU time, read from the server: a child that spins ~0.3 s reads about
    that (all of its threads' user + system time), and nothing once it is reaped."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint(flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # it has spun
        spun = process_cpu_s(child.pid)
        assert spun is not None and 0.3 <= spun < 5.0, spun
        time.sleep(0.2)  # asleep now: its clock stands still
        again = process_cpu_s(child.pid)
        assert again is not None and again - spun < 0.05
    finally:
        child.kill()
        child.wait()
    assert process_cpu_s(child.pid) is None


def _spinner(seconds: float) -> subprocess.Popen[bytes]:
    """A process that burns `seconds` of CPU, says so on stdout, then sleeps until killed."""
    spin = (f"import sys, time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"
            "print(flush=True)\nfor line in sys.stdin:\n    t = time.process_time()\n"
            "    while time.process_time() - t < float(line): pass\n    print(flush=True)\ntime.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.readline()
    return child


def _spin(child: subprocess.Popen[bytes], seconds: float) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(f"{seconds}\n".encode())
    child.stdin.flush()
    child.stdout.readline()


def test_engine_cpu_keeps_earlier_engines_and_leaves_out_a_restarts_start_up() -> None:
    """Two engine processes one after the other: the first's CPU counts whole (its start-up is over
    before anything is priced), the second's only from its attach (a restart's model load is no
    answer's cost), and the first's last reading stays in the total once it is gone."""
    cpu = EngineCpu()
    first = _spinner(0.2)
    try:
        cpu.attach(first.pid)
        assert cpu.total() >= 0.2
        _spin(first, 0.2)
        at_death = cpu.total()
        assert at_death >= 0.4
        cpu.retire()
    finally:
        first.kill()
        first.wait()
    assert cpu.total() == pytest.approx(at_death, abs=0.05)  # gone: its readings stay
    second = _spinner(0.3)  # its "model load": before the attach
    try:
        cpu.attach(second.pid)
        assert cpu.total() == pytest.approx(at_death, abs=0.05)
        _spin(second, 0.2)
        assert cpu.total() == pytest.approx(at_death + 0.2, abs=0.08)
    finally:
        second.kill()
        second.wait()


def test_engine_cpu_read_from_two_threads_never_counts_a_process_twice() -> None:
    """Pricing (the serving loop) and the telemetry thread read the engine's clock at once. A
    reading taken outside the lock and compared inside it looked like a new process whenever
    another thread had stored a later one, and added the engine's whole lifetime CPU again
    (a review's demo: 370 s reported for 4 s used)."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    cpu = EngineCpu()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads swap as often as they can
    try:
        cpu.attach(child.pid)
        stop = time.monotonic() + 1.0

        def hammer() -> None:
            while time.monotonic() < stop:
                cpu.total()

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = cpu.total()
        used = process_cpu_s(child.pid)  # after: the child's clock only goes up
        assert used is not None and total <= used, (total, used)
    finally:
        sys.setswitchinterval(switch)
        child.kill()
        child.wait()
