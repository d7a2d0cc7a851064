"""`localroute bench` end to end against a real localroute server on 127.0.0.1 (SmolLM2 tier).

Checks presence and sanity of every metric, not speed: speed is for the benchmark itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest

from localroute.bench import load_prompts
from localroute.bench.gpu import GpuSampler
from localroute.bench.loadgen import RequestResult
from localroute.bench.metrics import GPU_KEYS, gpu_metrics, summarize
from localroute.cli import main
from localroute.monitoring.telemetry import Nvml
from localroute.server import create_app
from tests.conftest import local_settings, serve_app
from tests.fakes import FakeNvml

LEVEL_KEYS = [
    "concurrency", "completed", "failed", "duration_s", "total_output_tokens", "mean_output_tokens",
    "request_throughput", "output_throughput", "escalation_rate", "peak_rss_mb",
    *[f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")],
]


@pytest.mark.slow
def test_bench_end_to_end_json_plot_and_saved_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = local_settings(tiers=[{"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}])
    plot, saved = tmp_path / "bench.png", tmp_path / "bench.json"
    dataset = tmp_path / "q.jsonl"
    dataset.write_text('{"question_id": 1, "turns": ["Name a fruit.", "And another?"]}\n'
                       '{"instruction": "Say hi.", "input": ""}\n{"prompt": "Count to three."}\n')
    with serve_app(create_app(settings)) as url:
        code = main(["bench", "--url", url, "--concurrency", "1,2", "--num-requests", "4", "--max-tokens", "8",
                     "--repeats", "2",
                     "--dataset", str(dataset), "--server-pid", str(os.getpid()), "--overhead-requests", "3",
                     "--json", "--plot", str(plot), "--save-result", str(saved)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(saved.read_text()) == result
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    levels = result["targets"]["localroute"]["levels"]
    assert [lvl["concurrency"] for lvl in levels] == [1, 2]
    for lvl in levels:
        assert set(LEVEL_KEYS) <= set(lvl)
        assert len(lvl["runs"]) == 2 and min(lvl["runs"]) <= lvl["output_throughput"] <= max(lvl["runs"])
        assert lvl["completed"] == 4 and lvl["failed"] == 0
        assert lvl["total_output_tokens"] == 4 * 8  # ignore_eos: every answer is max_tokens long
        assert lvl["mean_output_tokens"] == 8
        assert lvl["escalation_rate"] == 0.0  # one tier: nothing escalates
        assert lvl["peak_rss_mb"] > 50
        assert lvl["request_throughput"] > 0 and lvl["output_throughput"] > 0
        assert math.isclose(lvl["output_throughput"], lvl["request_throughput"] * 8, rel_tol=1e-6)
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < lvl[f"median_{name}_ms"] <= lvl[f"p99_{name}_ms"]
            assert lvl[f"mean_{name}_ms"] > 0
        assert lvl["p99_ttft_ms"] <= lvl["p99_e2el_ms"]
    overhead = result["targets"]["localroute"]["router_overhead"]
    assert overhead["n"] == 3 and 0 < overhead["p50_ms"] <= overhead["p99_ms"]
    assert result["config"]["n_prompts"] == 3
    scaling = result["ratios"]["localroute_vs_single_stream"]
    assert [r["concurrency"] for r in scaling] == [1, 2] and scaling[0]["output_throughput"] == 1.0
    checks = {t["target"]: t for t in result["targets_check"]}
    assert checks["router overhead p50 ms"]["value"] == overhead["p50_ms"]
    assert checks["c4 output tok/s vs llama-server (4 slots)"]["met"] is None  # not measured here
    assert result["machine"]["cpus"] >= 1
    assert result["extra_buffers"]["mode"] == "auto" and isinstance(result["extra_buffers"]["use_extra_bufts"], bool)
    # no GPU here: the run says why, and every level carries the GPU keys empty rather than made up
    assert result["gpu"]["available"] is False and result["gpu"]["reason"]
    assert all(lvl[key] is None for lvl in levels for key in GPU_KEYS)


def test_gpu_figures_of_a_level_from_nvml_readings() -> None:
    """The sampler's summary and the level's GPU figures, from NVML-shaped readings (a stand-in
    module: no GPU here; scripts/gpu_check.sh reads a real one)."""
    fake = FakeNvml()
    nvml = Nvml(fake)
    assert nvml.start()
    with GpuSampler(nvml, interval_s=0.01) as sampler:
        for _ in range(5):
            fake.energy_mj[0] += 500_000  # 500 J per step on device 0
            time.sleep(0.03)
    summary = sampler.summary()
    assert summary["samples"] >= 3 and summary["window_s"] > 0
    assert summary["gpu_util_mean"] == summary["gpu_util_max"] == 0.37  # the busier device
    assert summary["memory_used_max_bytes"] == 3 * 2**30  # both devices
    assert summary["power_w_mean"] == 230.0
    # device 0's counter rose 2,500 J; device 1 has no counter, so it integrates 80 W over the window
    assert summary["energy_j"] == pytest.approx(2500 + 80 * summary["window_s"], rel=0.05)
    level = gpu_metrics(summary, output_tokens=1000)
    assert level["gpu_energy_j_per_output_token"] == pytest.approx(summary["energy_j"] / 1000)
    assert level["gpu_memory_peak_mb"] == 3 * 1024 and level["gpu_util_mean"] == 0.37
    assert gpu_metrics(None, 1000) == dict.fromkeys(GPU_KEYS)


def test_vllm_baseline_without_vllm_says_how_to_get_it(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: the baseline runs (scripts/gpu_check.sh)")
    assert main(["bench", "--vs", "vllm", "--concurrency", "1", "--num-requests", "1"]) != 0
    assert "pip install 'localroute[gpu]'" in capsys.readouterr().err


def test_vllm_baseline_server_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `--vs vllm` starts on a GPU host: vLLM's OpenAI server with the same model, slots and
    context as the others, and time to compile before it must answer."""
    from localroute.bench import servers

    monkeypatch.setattr(servers.importlib.util, "find_spec", lambda name: object())
    server = servers.vllm_server(servers.EngineSpec(tmp_path / "m.gguf", 2, 512), 4)
    argv = server.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "m.gguf")
    assert argv[argv.index("--max-num-seqs") + 1] == "4" and argv[argv.index("--max-model-len") + 1] == "512"
    assert argv[argv.index("--port") + 1] == str(server.port) and server.model == "bench"
    assert server.start_timeout_s >= 600


def test_median_level_keeps_counts_whole_and_shows_every_run() -> None:
    from localroute.bench.runner import median_level

    runs = [{"concurrency": 4, "completed": c, "output_throughput": t, "p99_ttft_ms": p, "peak_rss_mb": None}
            for c, t, p in [(16, 90.0, 500.0), (15, 110.0, 300.0), (16, 100.0, 400.0), (14, 95.0, 450.0)]]
    m = median_level(runs)
    assert m["concurrency"] == 4 and m["completed"] == 15 and isinstance(m["completed"], int)
    assert m["output_throughput"] == 97.5 and m["p99_ttft_ms"] == 425.0 and m["peak_rss_mb"] is None
    assert m["runs"] == [90.0, 110.0, 100.0, 95.0]
    assert median_level(runs[:1]) == runs[0]


def test_warm_up_never_sends_a_measured_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A measured prompt sent in the warm-up sits in an engine's prompt cache (llama-server's per
    slot): its measured request then skips prefill, which no real workload of new prompts gets."""
    import asyncio

    from localroute.bench import loadgen

    sent: list[str] = []

    async def record(_client: object, _spec: object, prompt: str, _max_tokens: int) -> RequestResult:
        sent.append(prompt)
        return RequestResult(ok=True)

    monkeypatch.setattr(loadgen, "stream_one", record)
    spec = loadgen.LoadSpec("http://127.0.0.1:9/v1", "m", ["a", "b", "c"], concurrency=4, num_requests=4)
    asyncio.run(loadgen.warm_up(spec))
    assert len(sent) == 4 and not set(sent) & set(spec.prompts)


def test_prompts_from_dataset_keys_and_synthetic(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"turns": ["first turn", "second"]}\n\n{"question": "q?"}\n'
                    '{"instruction": "do it", "input": "on this"}\n{"other": 1}\n')
    assert load_prompts(data, 64) == ["first turn", "q?", "do it\n\non this"]
    synthetic = load_prompts(None, 16, n=3)
    assert len(synthetic) == 3 and all(len(p.split()) == 16 for p in synthetic)
    assert len(set(synthetic)) == 3


def test_summary_metric_definitions() -> None:
    """tpot = (e2el - ttft) / (tokens - 1); throughputs over the level's wall time; failures apart."""
    ok = RequestResult(ok=True, ttft_s=0.1, e2el_s=0.5, itl_s=[0.1, 0.1, 0.2], output_tokens=5, escalated=True)
    ok2 = RequestResult(ok=True, ttft_s=0.2, e2el_s=0.2, itl_s=[], output_tokens=1, escalated=False)
    bad = RequestResult(ok=False, error="HTTP 503")
    m = summarize([ok, ok2, bad], duration_s=2.0)
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == ["HTTP 503"]
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert math.isclose(m["mean_tpot_ms"], 100.0)  # only the request with > 1 token
    assert math.isclose(m["median_ttft_ms"], 150.0)
    assert math.isclose(m["mean_itl_ms"], 400 / 3)
    assert m["escalation_rate"] == 0.5


def test_report_shows_gpu_columns_only_with_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from localroute.bench.report import print_report

    level = {key: 1.0 for key in LEVEL_KEYS} | {"concurrency": 4, "completed": 8, "failed": 0,
                                                 "gpu_util_mean": 0.62, "gpu_util_max": 0.9,
                                                 "gpu_power_mean_w": 310.0, "gpu_energy_j_per_output_token": 0.412}
    result = {"targets": {"localroute": {"levels": [level]}}, "ratios": {}, "targets_check": [],
              "machine": {"cpus": 16, "processor": "x86_64", "loadavg_start": [0.5]},
              "gpu": {"available": True, "reason": None, "devices": [{"index": 0, "name": "NVIDIA H200"}]}}
    print_report(result)
    out = capsys.readouterr().out
    assert "62%/90%" in out and "0.412" in out
    result["gpu"] = {"available": False, "reason": "NVML unavailable: no driver", "devices": []}
    print_report(result)
    out = capsys.readouterr().out
    assert "62%/90%" not in out and "NVML unavailable: no driver" in out


def test_gpu_figures_count_only_the_visible_gpus() -> None:
    from localroute.bench.gpu import visible_gpus

    assert visible_gpus("") is None and visible_gpus("GPU-1a2b,GPU-3c4d") is None
    assert visible_gpus("1") == frozenset({1}) and visible_gpus("0, 2") == frozenset({0, 2})
    nvml = Nvml(FakeNvml())
    assert nvml.start()
    with GpuSampler(nvml, interval_s=0.01, devices=frozenset({1})) as sampler:
        time.sleep(0.05)
    summary = sampler.summary()
    assert summary["gpu_util_max"] == 0.05 and summary["memory_used_max_bytes"] == 2 * 2**30  # device 1 only
    assert summary["power_w_mean"] == 80.0


def test_stopping_a_server_waits_for_its_whole_process_group(tmp_path: Path) -> None:
    """A server's helper process that outlives it (vLLM's engine core holding GPU memory) is waited
    for, and killed if it ignores SIGTERM, before the next level starts a server."""
    import subprocess
    import sys

    from localroute.bench.servers import ManagedServer

    pid_file = tmp_path / "child.pid"
    code = ("import signal, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(60)\n")
    server = ManagedServer("group", [], "m")
    server.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.2)  # the child has set SIG_IGN for SIGTERM
    server.stop(timeout_s=1.0)
    state = Path(f"/proc/{child}/status")  # it ignored SIGTERM: only the group's SIGKILL ended it
    assert not state.exists() or "\nState:\tZ" in state.read_text()  # gone (or dead, awaiting its reaper)


def test_rss_counts_the_server_and_its_engine_processes() -> None:
    """A server whose engine runs in a child process is measured whole (engine_isolation=process)."""
    import subprocess
    import sys

    from localroute.bench.servers import process_tree, rss_bytes, tree_rss_bytes

    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        own = rss_bytes(parent.pid)
        total = tree_rss_bytes(parent.pid)
        assert own is not None and total is not None and total > own
    finally:
        for pid in process_tree(parent.pid)[::-1]:
            os.kill(pid, 9)
        parent.wait()


def test_localroute_thread_baseline_is_the_same_server_with_the_engine_in_process() -> None:
    from localroute.bench.runner import _baseline_factory
    from localroute.bench.servers import EngineSpec

    name, make = _baseline_factory("localroute-thread", EngineSpec(Path("m.gguf"), 2, 512))
    server = make(4)
    assert name == "localroute-thread" and server.name == "localroute-thread"
    assert server.env["LOCALROUTE_ENGINE_ISOLATION"] == "thread"


@pytest.mark.parametrize("mode", ["on", "off"])
def test_llama_server_baseline_gets_the_same_extra_buffer_choice(tmp_path: Path, mode: str) -> None:
    """llama-server repacks weights unless told not to: `--no-repack` exactly when localroute's
    choice is off, so both engines use the same weight layout (and neither crashes on AMX)."""
    from localroute.bench import servers

    binary = tmp_path / "llama-server"
    binary.write_text("")
    spec = servers.EngineSpec(tmp_path / "m.gguf", 2, 512, extra_buffers=mode)
    argv = servers.llama_server(binary, spec, 4).argv
    assert ("--no-repack" in argv) is (mode == "off")
    assert servers.localroute_server(spec, 4).env["LOCALROUTE_LLAMA_EXTRA_BUFFERS"] == mode


@pytest.mark.slow
def test_llama_cpp_python_baseline_loads_with_the_choice_and_answers(smollm2_path: Path) -> None:
    """`--vs llama-cpp-python` runs llama_cpp.server through localroute's wrapper, which applies
    the extra-buffer choice before llama_cpp.server loads the model; it answers the official client."""
    from openai import OpenAI

    from localroute.backends.cpu_features import extra_buffers_choice
    from localroute.bench import servers

    spec = servers.EngineSpec(smollm2_path, 2, 512, extra_buffers="auto")
    server = servers.llama_cpp_python_server(spec, 1)
    assert server.argv[1:3] == ["-m", "localroute.bench.llama_cpp_python_server"]
    want = extra_buffers_choice("auto").use_extra_bufts
    assert server.env["LOCALROUTE_USE_EXTRA_BUFTS"] == ("1" if want else "0")
    with server:
        out = OpenAI(base_url=server.base_url, api_key="unused").completions.create(
            model="bench", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert out.choices[0].text.strip()


def test_bench_report_says_which_extra_buffers_every_engine_used(capsys: pytest.CaptureFixture[str]) -> None:
    from localroute.bench.report import print_report
    from localroute.bench.runner import BenchConfig, _extra_buffers_json

    eb = _extra_buffers_json(BenchConfig(concurrency=[1], model_path=Path("m.gguf"), n_threads=2, extra_buffers="off"))
    assert eb == {"mode": "off", "use_extra_bufts": False, "reason": "llama_extra_buffers=off",
                  "llama_server_flag": "--no-repack"}
    print_report({"targets": {}, "ratios": {}, "targets_check": [], "extra_buffers": eb,
                  "machine": {"cpus": 2, "processor": "x86_64", "loadavg_start": [0.5]}})
    assert "extra buffer types off for every llama.cpp engine" in capsys.readouterr().out


@pytest.mark.slow
def test_router_overhead_is_measured_for_the_thread_engine_target_too(capsys: pytest.CaptureFixture[str]) -> None:
    """`--vs localroute-thread` compares the router overhead as well as throughput: each localroute
    target gets its own sweep (before, only the process-engine target had one, and setting
    LOCALROUTE_ENGINE_ISOLATION for the command did not change the server the bench started)."""
    code = main(["bench", "--local-model", "smollm2-135m", "--concurrency", "1", "--num-requests", "2",
                 "--max-tokens", "4", "--overhead-requests", "3", "--threads", "2", "--vs", "localroute-thread",
                 "--json"])
    assert code == 0
    targets = json.loads(capsys.readouterr().out)["targets"]
    for name in ("localroute", "localroute-thread"):
        overhead = targets[name]["router_overhead"]
        assert overhead["n"] == 3 and 0 < overhead["p50_ms"] <= overhead["p99_ms"], (name, overhead)
