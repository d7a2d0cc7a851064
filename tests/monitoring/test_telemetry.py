"""NVML through a stand-in module (the real GPU path is the GPU issue's device check), the
"unavailable" path on this GPU-less machine, CPU time windows and the batch share."""

from __future__ import annotations

import ctypes.util
import importlib.util
import time
from pathlib import Path

import pytest

from localroute.monitoring.telemetry import Nvml, Sample, Telemetry, _mean_step, cpu_info, environment
from tests.fakes import BrokenNvml, FakeNvml


def test_fake_nvml_readings() -> None:
    fake = FakeNvml()
    nv = Nvml(fake)
    assert nv.start() and nv.available and nv.driver_version == "550.54"
    g0, g1 = nv.read()
    assert g0.name == "NVIDIA H200" and g0.utilization_ratio == pytest.approx(0.37)
    assert g0.memory_used_bytes == 2**30 and g0.memory_total_bytes == 80 * 2**30
    assert g0.power_w == pytest.approx(150.0) and g0.energy_j == pytest.approx(1000.0)
    assert g0.energy_method == "nvml_total_energy"
    assert g1.energy_method == "nvml_power_x_time" and g1.energy_j == pytest.approx(0.0)
    nv.close()
    assert fake.shutdowns == 1


def test_power_x_time_fallback_integrates_between_reads() -> None:
    fake = FakeNvml()
    nv = Nvml(fake)
    first = nv.read()[1].energy_j
    time.sleep(0.05)
    second = nv.read()[1].energy_j
    assert first is not None and second is not None and second > first  # 80 W for a while


def test_unavailable_nvml_never_raises() -> None:
    nv = Nvml(BrokenNvml())
    assert nv.start() is False and nv.read() == []
    assert "NVML Shared Library Not Found" in (nv.reason or "")
    tel = Telemetry(interval_s=0.01, nvml=nv)
    tel.start()
    try:
        s = tel.sample()
        assert s.gpu_energy_j is None
        assert tel.status()["gpu"] == "unavailable" and tel.gpus() == []
    finally:
        tel.stop()


NVIDIA_DEVICE = any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0"))


def test_real_pynvml_on_this_machine_is_unavailable_or_works() -> None:
    """The real pynvml (nvidia-ml-py, a dev dependency): on a host with an NVIDIA device it reads
    every device; without one it says exactly why (here: no NVML library) and reads nothing."""
    assert importlib.util.find_spec("pynvml") is not None, "nvidia-ml-py is a dev dependency"
    nv = Nvml()
    try:
        ok = nv.start()
        if NVIDIA_DEVICE:
            assert ok, nv.reason
            readings = nv.read()
            assert readings and [g.index for g in readings] == [d["index"] for d in nv.devices()]
            assert nv.driver_version
            for g in readings:
                assert g.name and g.memory_total_bytes and g.memory_total_bytes >= (g.memory_used_bytes or 0) > 0
                assert g.utilization_ratio is not None and 0.0 <= g.utilization_ratio <= 1.0
                assert g.power_w is not None and g.power_w > 0 and g.energy_j is not None and g.energy_j >= 0
        else:
            assert ok is False and not nv.available and nv.read() == [] and nv.devices() == []
            if ctypes.util.find_library("nvidia-ml") is None:  # no driver library at all, as here
                assert nv.reason == "NVML unavailable: NVMLError_LibraryNotFound: NVML Shared Library Not Found"
            else:  # the library without a device: the driver or the device count says no
                assert nv.reason is not None and (nv.reason.startswith("NVML unavailable: NVMLError_")
                                                  or nv.reason == "NVML found no NVIDIA GPU"), nv.reason
    finally:
        nv.close()


def test_telemetry_gpu_energy_window_with_fake_nvml() -> None:
    fake = FakeNvml()
    tel = Telemetry(interval_s=60, nvml=Nvml(fake), load=lambda: (0, 1))
    tel.start()
    try:
        s0 = tel.sample()
        fake.energy_mj[0] += 50_000  # the device burns 50 J
        s1 = tel.sample()
        u = tel.window(s0.t, s1.t)
        # device 0: exactly +50 J; device 1: a little from 80 W x elapsed (power x time)
        assert u.gpu_energy_j is not None and u.gpu_energy_j >= 50.0
        assert [g.index for g in tel.gpus()] == [0, 1]
    finally:
        tel.stop()


def test_cpu_window_counts_this_process_cpu_time() -> None:
    tel = Telemetry(interval_s=60)
    tel.start()
    try:
        s0 = tel.sample()
        x = 0
        while time.process_time() - s0.cpu_s < 0.05:  # burn 50 ms of CPU
            x += 1
        s1 = tel.sample()
        u = tel.window(s0.t, s1.t)
        assert u.cpu_s >= 0.05
    finally:
        tel.stop()


def test_a_kept_reading_replaces_the_one_before_it_and_sharpens_its_own_window_end() -> None:
    cpu = [0.0]
    tel = Telemetry(interval_s=60, nvml=Nvml(BrokenNvml()), cpu_energy=lambda: None, cpu_clock=lambda: cpu[0])
    s0 = tel.sample(periodic=True)
    cpu[0] = 1.8
    r1 = tel.reading()
    assert list(tel._samples) == [s0]  # not kept until `keep`
    tel.keep(r1)
    cpu[0] = 2.0
    r2 = tel.reading()
    tel.keep(r2)
    tel.keep(r1)  # older than the newest kept: not kept
    assert list(tel._samples) == [s0, r2]  # only the newest reading since the periodic sample
    assert r2.cpu_s == 2.0 and r2.active_cpu is None
    # r1 is no longer kept, but its own window ends on it (interpolating s0 -> r2 would read ~1.0)
    assert tel.window(s0.t, r1.t, r1).cpu_s == pytest.approx(1.8)
    cpu[0] = 3.0
    s1 = tel.sample(periodic=True)
    cpu[0] = 4.0
    r3 = tel.reading()
    tel.keep(r3)
    assert list(tel._samples) == [s0, r2, s1, r3]  # a periodic sample is never replaced
    assert tel.window(s0.t, r1.t, r1).cpu_s == pytest.approx(1.8)  # put back in time order


def test_mean_step_is_time_weighted_and_at_least_one() -> None:
    samples = [Sample(0, 0, active_cpu=4), Sample(1, 0, active_cpu=2), Sample(3, 0, active_cpu=0),
               Sample(2, 0)]  # a sample without a load reading is ignored
    samples.sort(key=lambda s: s.t)
    assert _mean_step(samples, 0, 1, lambda s: s.active_cpu) == pytest.approx(4)
    assert _mean_step(samples, 0.5, 2, lambda s: s.active_cpu) == pytest.approx((4 * 0.5 + 2 * 1) / 1.5)
    assert _mean_step(samples, 3, 5, lambda s: s.active_cpu) == 1.0  # idle reads as the request alone
    assert _mean_step([], 0, 1, lambda s: s.active_cpu) == 1.0


def test_environment_report_shape() -> None:
    env = environment(Nvml(BrokenNvml()))
    assert env["gpu"]["nvml"] == "unavailable" and env["gpu"]["reason"]
    assert env["cpu"]["usable_cores"] >= 1
    assert set(env["engines"]) >= {"llama_cpp", "vllm", "torch", "transformers"}
    assert env["engines"]["llama_cpp"]["importable"] is True  # the test environment builds it
    assert env["would_use"]["engine"] == "llama_cpp" and env["would_use"]["device"] == "cpu"
    env_gpu = environment(Nvml(FakeNvml()))
    assert env_gpu["gpu"]["nvml"] == "available" and len(env_gpu["gpu"]["devices"]) == 2
    assert cpu_info()["model"]


def test_window_reads_only_the_recent_history_and_agrees_with_all_of_it() -> None:
    """Pricing calls window() once per attempt: with a full history (4,096 samples) it used to copy
    and scan all of it. It now walks back from the newest sample to just before t0; the figures
    must be the ones the whole history gives."""
    from localroute.monitoring.telemetry import _delta

    tel = Telemetry(interval_s=60)
    for i in range(4096):  # 0.25 s apart; every 7th lacks a load reading, every 5th its energy
        tel._samples.append(Sample(i * 0.25, i * 0.1, cpu_energy_j=None if i % 5 == 0 else i * 2.0,
                                   active_cpu=None if i % 7 == 0 else 1 + i % 3))
    everything = list(tel._samples)
    for t0, t1 in [(1000.1, 1010.3), (1023.6, 1023.9), (0.2, 3.0), (1023.0, 1100.0)]:
        u = tel.window(t0, t1)
        assert u.cpu_s == pytest.approx(_delta(everything, t0, t1, lambda s: s.cpu_s))
        assert u.cpu_energy_j == pytest.approx(_delta(everything, t0, t1, lambda s: s.cpu_energy_j))
        assert u.mean_active_cpu == pytest.approx(_mean_step(everything, t0, t1, lambda s: s.active_cpu))
