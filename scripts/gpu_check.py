"""Device check for a GPU host with no network: serve the bundled SmolLM2 GGUF through the
transformers backend on CUDA, put a small concurrent load on it, read NVML throughout, and print
one JSON summary on stdout.

Run through scripts/gpu_check.sh. Exit codes: 0 ok; 3 no usable GPU here (with the reason);
4 a package is missing; 5 the server did not come up or the load failed.

Steps:
1. preflight: NVML sees a GPU (localroute.monitoring.telemetry.Nvml), torch sees CUDA, the hf extra imports;
2. `localroute serve --config <one transformers tier> --backend transformers` on 127.0.0.1 with
   LOCALROUTE_TORCH_DEVICE=cuda, waiting for /health;
3. a load of --requests chat requests, --concurrency at a time, greedy, --max-tokens each, while a
   sampler thread reads NVML every 0.2 s (utilisation, memory, power, cumulative energy);
4. `localroute bench` against the same server when that command exists (its output is attached);
5. where vLLM imports, `localroute bench --backend vllm --vs vllm` at 4 streams: localroute's vLLM
   tier against vLLM's own OpenAI server, same model (--no-vllm skips it; each server start takes
   minutes);
6. the summary: tokens/s, latency percentiles, GPU utilisation, memory, power, energy per token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Translate 'good morning' to Spanish.",
    "Is this review positive? 'Great phone, battery lasts all day.' Answer yes or no.",
    "Give me a JSON object with keys name and age.",
    "Summarise: the meeting moved to Friday because the room was booked.",
    "Name a fruit that is yellow.",
)


def fail(code: int, message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(code)


def preflight() -> tuple[Any, dict[str, Any]]:
    """NVML and CUDA both present, or exit 3 saying which is not; the hf extra, or exit 4."""
    sys.path.insert(0, str(REPO))
    try:
        from localroute.monitoring.telemetry import Nvml
    except ImportError as exc:
        fail(4, f"localroute is not importable ({exc}); install it first: pip install -e '.[hf,gpu]'")
    nvml = Nvml()
    if not nvml.start():
        fail(3, f"no NVIDIA GPU usable here: {nvml.reason}. Run this on a GPU host.")
    absent = [m for m in ("torch", "transformers", "gguf", "accelerate", "httpx") if importlib.util.find_spec(m) is None]
    if absent:
        fail(4, f"missing packages: {', '.join(absent)}; install the carried wheels: pip install -e '.[hf]'")
    import torch

    if not torch.cuda.is_available():
        fail(3, f"NVML sees {nvml.devices()} but torch {torch.__version__} has no CUDA (a CPU-only torch build?)")
    import transformers

    info = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus_visible": len(nvml.devices()),
        "driver": nvml.driver_version,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    return nvml, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, port: int, localroute: list[str]) -> subprocess.Popen[bytes]:
    config = tmp / "gpu_check.toml"
    config.write_text(
        f'models_dir = "{REPO / "models"}"\nn_parallel = 16\nn_ctx = 1024\nrouting_log_path = "{tmp / "log.db"}"\n'
        '[[tiers]]\nname = "smollm2-135m"\nkind = "llama_cpp"\nmodel = "smollm2-135m"\n'
    )
    env = {**os.environ, "LOCALROUTE_TORCH_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"}
    cmd = [*localroute, "serve", "--config", str(config), "--backend", "transformers", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=(tmp / "server.log").open("wb"), stderr=subprocess.STDOUT)


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            if r.status_code == 200:
                body: dict[str, Any] = r.json()
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy within {timeout_s:g}s")


async def load(base: str, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    errors = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens, errors
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "logprobs": True}
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(f"{base}/v1/chat/completions", json=body)
            if r.status_code != 200:
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)
            tokens += int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": n,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "errors": errors,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "latency_s_p50": round(lat[len(lat) // 2], 3) if lat else None,
        "latency_s_p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
    }


def bench(localroute: list[str], args: list[str], timeout_s: float) -> dict[str, Any]:
    """`localroute bench ARGS --json`, its JSON (or output tail) attached. On timeout it gets
    SIGTERM first, so it stops the servers it started (vLLM's hold GPU memory), then SIGKILL."""
    cmd = [*localroute, "bench", *args, "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    note = ""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout_s:g}s; "
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    try:
        parsed: Any = json.loads(out)
    except json.JSONDecodeError:
        parsed = out[-2000:]
    return {"command": " ".join(cmd[len(localroute):]), "rc": proc.returncode, "output": parsed,
            "stderr_tail": note + err[-1500:]}


def run_bench(localroute: list[str], base: str, pid: int) -> dict[str, Any] | None:
    """`localroute bench` against the running server, when this checkout has that command."""
    probe = subprocess.run([*localroute, "bench", "--help"], check=False, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return None
    return bench(localroute, ["--url", f"{base}/v1", "--server-pid", str(pid), "--concurrency", "1,4,16",
                              "--num-requests", "32", "--max-tokens", "64", "--overhead-requests", "50"], 600)


def run_vllm_bench(localroute: list[str]) -> dict[str, Any] | None:
    """localroute on vLLM against vLLM's own server, when vLLM is installed (two server starts)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    return bench(localroute, ["--backend", "vllm", "--vs", "vllm", "--concurrency", "4", "--num-requests", "32",
                              "--max-tokens", "64", "--overhead-requests", "50", "--local-model",
                              str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")], 1900)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--startup-timeout-s", type=float, default=300)
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM bench")
    args = ap.parse_args()

    nvml, info = preflight()
    localroute = [sys.executable, "-m", "localroute"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    summary: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **info,
                               "backend": "transformers", "model": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        proc = start_server(tmp, port, localroute)
        try:
            t0 = time.perf_counter()
            try:
                health = wait_healthy(base, proc, args.startup_timeout_s)
            except RuntimeError as exc:
                log = (tmp / "server.log").read_text(errors="replace")[-3000:]
                fail(5, f"{exc}; server log tail:\n{log}")
            summary["startup_s"] = round(time.perf_counter() - t0, 1)
            tier = health.get("tiers", {}).get("smollm2-135m", health)
            summary["device"], summary["dtype"] = tier.get("device"), tier.get("dtype")
            summary["logprobs_mode"] = tier.get("logprobs_mode")
            idle = nvml.read()
            summary["idle"] = {"gpu_util": idle[0].utilization_ratio, "power_w": idle[0].power_w,
                               "memory_used_bytes": idle[0].memory_used_bytes} if idle else None
            asyncio.run(load(base, 4, 4, 8))  # warm-up: kernels, allocator
            from localroute.bench.gpu import GpuSampler

            sampler = GpuSampler(nvml)
            sampler.start()
            try:
                summary["load"] = asyncio.run(load(base, args.requests, args.concurrency, args.max_tokens))
            finally:
                sampler.stop()
            summary["nvml"] = sampler.summary()
            e, toks = summary["nvml"]["energy_j"], summary["load"]["completion_tokens"]
            summary["energy_j_per_1k_output_tokens"] = round(1000 * e / toks, 2) if e is not None and toks else None
            summary["bench"] = run_bench(localroute, base, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            nvml.close()
    if not args.no_vllm:
        summary["vllm_bench"] = run_vllm_bench(localroute)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["load"]["errors"] == 0 else 5


if __name__ == "__main__":
    sys.exit(main())
