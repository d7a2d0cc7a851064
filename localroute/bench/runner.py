"""`localroute bench`: a concurrency sweep against localroute and, in the same run, the engines
people would otherwise run directly (same model file, threads, prompts and output length)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localroute.bench.gpu import GpuSampler
from localroute.bench.loadgen import LoadSpec, RequestResult, router_overhead, run_load, warm_up
from localroute.bench.metrics import gpu_metrics, percentiles_ms, summarize
from localroute.bench.servers import (
    EngineSpec,
    ManagedServer,
    RssSampler,
    llama_cpp_python_server,
    llama_server,
    localroute_server,
    require_vllm,
    vllm_server,
)
from localroute.errors import ConfigError
from localroute.monitoring.telemetry import Nvml

PROMPT_KEYS = ("prompt", "question", "instruction")
SYNTHETIC_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "seven",
                   "wizards", "quietly", "juggle", "boxes", "of", "frozen", "pizza", "near", "a", "calm", "river"]


@dataclass(slots=True)
class BenchConfig:
    """Everything one run needs; the CLI fills it from flags."""

    concurrency: list[int]
    model_path: Path
    n_threads: int
    num_requests: int | None = 32
    duration_s: float | None = None
    max_tokens: int = 128
    n_ctx: int = 1024
    dataset: Path | None = None
    input_len: int = 64
    url: str | None = None  # an already running endpoint (…/v1) instead of starting localroute
    model: str = "localroute/cascade"
    server_pid: int | None = None  # for peak RSS of a server given by --url
    baselines: list[str] = field(default_factory=list)  # "llama-cpp-python", "llama-server=/path", "vllm"
    backend: str = "llama_cpp"  # the engine of the localroute server the bench starts
    ignore_eos: bool = True
    warmup: bool = True
    overhead_requests: int = 20
    progress: bool = True
    # Each level this many times per target, targets interleaved (their order flips every repeat);
    # the result is the median run. On a shared or throttled machine a single sequential pass lets
    # drift decide a 10-20% comparison; repeats expose that spread (`runs` in each level).
    repeats: int = 1
    extra_buffers: str = "auto"  # settings.llama_extra_buffers, for localroute and every llama.cpp baseline


def load_prompts(dataset: Path | None, input_len: int, n: int = 64) -> list[str]:
    """Prompts from a jsonl file (first of `turns`, or `prompt`/`question`/`instruction`, with any
    `input` appended) or `n` synthetic prompts of about `input_len` words."""
    if dataset is None:
        return [" ".join(SYNTHETIC_WORDS[(i + j) % len(SYNTHETIC_WORDS)] for j in range(input_len))
                for i in range(n)]
    prompts: list[str] = []
    try:
        lines = dataset.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {dataset}: {exc}", param="dataset") from None
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        text = None
        turns = row.get("turns")
        if isinstance(turns, list) and turns:
            first = turns[0]
            text = first if isinstance(first, str) else (first.get("content") if isinstance(first, dict) else None)
        for key in PROMPT_KEYS:
            if text is None and isinstance(row.get(key), str):
                text = row[key]
        if text and isinstance(row.get("input"), str) and row["input"].strip():
            text = f"{text}\n\n{row['input']}"
        if text:
            prompts.append(text)
    if not prompts:
        raise ConfigError(f"no prompts in {dataset} (keys: turns, {', '.join(PROMPT_KEYS)})", param="dataset")
    return prompts


def _baseline_factory(text: str, spec: EngineSpec) -> tuple[str, Callable[[int], ManagedServer]]:
    if text == "llama-cpp-python":
        return text, lambda c: llama_cpp_python_server(spec, c)
    if text.startswith("llama-server="):
        binary = Path(text.split("=", 1)[1]).expanduser()
        return "llama-server", lambda c: llama_server(binary, spec, c)
    if text == "vllm":
        require_vllm()  # before any server starts, not at the first level
        return text, lambda c: vllm_server(spec, c)
    if text == "localroute-thread":  # the engine inside the server process: what process isolation costs
        return text, lambda c: localroute_server(spec, c, isolation="thread")
    raise ConfigError(f"unknown baseline {text!r}: use llama-cpp-python, llama-server=/path/to/binary, vllm or "
                      "localroute-thread", param="vs")


def _level(name: str, spec: LoadSpec, pid: int | None, cfg: BenchConfig,
           nvml: Nvml | None = None) -> tuple[dict[str, Any], list[RequestResult]]:
    """One level against one server: peak RSS of its process (when known) and, where NVML sees a
    GPU, its utilisation and energy over the level."""
    from tqdm import tqdm

    if cfg.warmup:
        asyncio.run(warm_up(spec))
    bar = tqdm(total=spec.num_requests, desc=f"{name} c={spec.concurrency}", unit="req", file=sys.stderr,
               disable=None if cfg.progress else True, leave=False)
    rss = RssSampler(pid) if pid is not None else None
    gpu = GpuSampler(nvml) if nvml is not None and nvml.available else None
    try:
        with contextlib.ExitStack() as samplers:
            for sampler in (rss, gpu):
                if sampler is not None:
                    samplers.enter_context(sampler)
            results, wall = asyncio.run(run_load(spec, on_done=lambda _r: bar.update()))
    finally:
        bar.close()
    metrics = {"concurrency": spec.concurrency, **summarize(results, wall)}
    metrics["peak_rss_mb"] = rss.peak / 2**20 if rss is not None and rss.peak else None
    metrics.update(gpu_metrics(gpu.summary() if gpu is not None else None, metrics["total_output_tokens"]))
    return metrics, results


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the sweep on every target; return the JSON-able result (config, levels, ratios, targets)."""
    if any(c < 1 for c in cfg.concurrency):
        raise ConfigError("concurrency levels must be >= 1", param="concurrency")
    engine = EngineSpec(cfg.model_path, cfg.n_threads, cfg.n_ctx, cfg.backend, cfg.extra_buffers)
    prompts = load_prompts(cfg.dataset, cfg.input_len)
    targets: list[tuple[str, Callable[[int], ManagedServer] | None]] = [
        ("localroute", None if cfg.url else (lambda c: localroute_server(engine, c)))
    ]
    targets += [_baseline_factory(b, engine) for b in cfg.baselines]
    if cfg.repeats < 1:
        raise ConfigError("repeats must be >= 1", param="repeats")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    nvml = Nvml()
    nvml.start()  # GPU figures per level where a GPU is readable; the reason where not
    out: dict[str, Any] = {"config": _config_json(cfg, len(prompts)), "extra_buffers": _extra_buffers_json(cfg),
                           "targets": {},
                           "gpu": {"available": nvml.available, "reason": nvml.reason, "devices": nvml.devices()}}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {c: [] for c in cfg.concurrency} for name, _ in targets}
    try:
        overheads = _sweep(cfg, targets, prompts, runs, nvml)
    finally:
        nvml.close()
    for name, _ in targets:
        entry: dict[str, Any] = {"levels": [median_level(runs[name][c]) for c in cfg.concurrency]}
        if name in overheads:  # every localroute target (process and thread engines alike)
            server_side, client_side = overheads[name]
            entry["router_overhead"] = percentiles_ms(server_side)  # server side (Server-Timing): the target
            entry["client_overhead"] = percentiles_ms(client_side)  # + both HTTP stacks and loopback
        out["targets"][name] = entry
    out["ratios"] = ratios(out["targets"])
    out["targets_check"] = check_targets(out["targets"], out["ratios"])
    out["machine"] = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return out


def _sweep(cfg: BenchConfig, targets: list[tuple[str, Callable[[int], ManagedServer] | None]], prompts: list[str],
           runs: dict[str, dict[int, list[dict[str, Any]]]], nvml: Nvml) -> dict[str, tuple[list[float], list[float]]]:
    """Every level of every target, `cfg.repeats` times, targets interleaved; fills `runs` and
    returns each localroute target's router overhead samples (server side, client side), taken
    once per target after its first level."""
    overheads: dict[str, tuple[list[float], list[float]]] = {}
    for r in range(cfg.repeats):
        for c in cfg.concurrency:
            for name, factory in targets if r % 2 == 0 else targets[::-1]:
                server = factory(c) if factory is not None else None
                if server is not None:
                    server.start()
                try:
                    base_url = server.base_url if server is not None else str(cfg.url).rstrip("/")
                    model = server.model if server is not None else cfg.model
                    pid = server.pid if server is not None else cfg.server_pid
                    spec = LoadSpec(base_url, model, prompts, c, cfg.num_requests, cfg.duration_s, cfg.max_tokens,
                                    cfg.ignore_eos)
                    metrics, _ = _level(name, spec, pid, cfg, nvml)
                    if server is not None and (hwm := server.peak_rss()) is not None:
                        metrics["peak_rss_mb"] = max(metrics["peak_rss_mb"] or 0.0, hwm / 2**20)
                    if name.startswith("localroute") and name not in overheads and cfg.overhead_requests > 0:
                        overheads[name] = asyncio.run(router_overhead(
                            base_url, model, prompts, cfg.overhead_requests, min(cfg.max_tokens, 32)))
                finally:
                    if server is not None:
                        server.stop()
                runs[name][c].append(metrics)
    return overheads


def median_level(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's runs as one: the median of every numeric metric (None where no run has it), and
    with several runs each run's output throughput under `runs`, so the spread stays visible."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, bool) or not isinstance(first, int | float | None):
            out[key] = first
            continue
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if not values:
            out[key] = None
        else:  # counts stay whole numbers: the lower median is one of the runs' values
            out[key] = statistics.median_low(values) if isinstance(first, int) else statistics.median(values)
    out["concurrency"] = runs[0]["concurrency"]
    out["runs"] = [r["output_throughput"] for r in runs]
    return out


def _extra_buffers_json(cfg: BenchConfig) -> dict[str, Any]:
    """Which llama.cpp weight buffers every llama.cpp engine of the run used, and why."""
    from localroute.backends.cpu_features import extra_buffers_choice

    choice = extra_buffers_choice(cfg.extra_buffers)
    return {"mode": cfg.extra_buffers, "use_extra_bufts": choice.use_extra_bufts, "reason": choice.reason,
            "llama_server_flag": None if choice.use_extra_bufts else "--no-repack"}


def _config_json(cfg: BenchConfig, n_prompts: int) -> dict[str, Any]:
    data = asdict(cfg)
    data["model_path"] = str(cfg.model_path)
    data["dataset"] = str(cfg.dataset) if cfg.dataset else None
    data["n_prompts"] = n_prompts
    return data


def _by_c(target: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {lvl["concurrency"]: lvl for lvl in target["levels"]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(targets: dict[str, Any]) -> dict[str, Any]:
    """localroute against each baseline per level (> 1: localroute higher), and against its own
    single stream (scaling)."""
    out: dict[str, Any] = {}
    lr = _by_c(targets["localroute"]) if "localroute" in targets else {}
    for name, target in targets.items():
        if name == "localroute":
            continue
        rows = []
        for c, lvl in _by_c(target).items():
            if c not in lr:
                continue
            rows.append({
                "concurrency": c,
                "output_throughput": _ratio(lr[c]["output_throughput"], lvl["output_throughput"]),
                "request_throughput": _ratio(lr[c]["request_throughput"], lvl["request_throughput"]),
                "p99_e2el_ms": _ratio(lr[c]["p99_e2el_ms"], lvl["p99_e2el_ms"]),
                "peak_rss_mb": _ratio(lr[c]["peak_rss_mb"], lvl["peak_rss_mb"]),
            })
        out[name] = rows
    if 1 in lr:
        out["localroute_vs_single_stream"] = [
            {"concurrency": c, "output_throughput": _ratio(lvl["output_throughput"], lr[1]["output_throughput"])}
            for c, lvl in lr.items()
        ]
    return out


def check_targets(targets: dict[str, Any], rat: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured)."""
    def at(rows: Sequence[dict[str, Any]], c: int, key: str) -> float | None:
        return next((r[key] for r in rows if r["concurrency"] == c), None)

    overhead = targets.get("localroute", {}).get("router_overhead", {})
    items = [
        ("c4 output tok/s vs llama-server (4 slots)", at(rat.get("llama-server", []), 4, "output_throughput"),
         ">=", 1.0),
        ("c4 output tok/s vs localroute single stream", at(rat.get("localroute_vs_single_stream", []), 4,
                                                             "output_throughput"), ">=", 1.25),
        ("router overhead p50 ms", overhead.get("p50_ms"), "<=", 1.0),
        ("router overhead p99 ms", overhead.get("p99_ms"), "<=", 5.0),
        ("c16 peak RSS vs llama-server", at(rat.get("llama-server", []), 16, "peak_rss_mb"), "<=", 1.5),
        # what the engine's own process costs (issue 13): against the same server with the engine in-thread
        ("c1 output tok/s vs localroute-thread", at(rat.get("localroute-thread", []), 1, "output_throughput"),
         ">=", 0.97),
        ("c4 output tok/s vs localroute-thread", at(rat.get("localroute-thread", []), 4, "output_throughput"),
         ">=", 0.97),
    ]
    return [
        {"target": name, "value": value, "goal": f"{op} {goal:g}",
         "met": None if value is None else (value >= goal if op == ">=" else value <= goal)}
        for name, value, op, goal in items
    ]
