"""Servers the benchmark starts itself: localroute, llama-cpp-python's server, llama.cpp's
llama-server, vLLM's OpenAI server on a GPU host — same model file, same threads, same context per
sequence — plus peak-RSS sampling.

Each runs in a subprocess on a free 127.0.0.1 port and is stopped (SIGTERM, then SIGKILL) when the
level is over, so one engine never competes with another for the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

import httpx

from localroute.errors import BackendUnavailableError, ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int, key: str = "VmRSS") -> int | None:
    """Resident memory of a process from /proc (VmRSS now, VmHWM the peak); None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a localroute server's engine processes are its children)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return tree


def tree_rss_bytes(pid: int) -> int | None:
    """VmRSS summed over a process and its descendants; None off Linux."""
    sizes = [rss_bytes(p) for p in process_tree(pid)]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


class RssSampler:
    """Largest VmRSS of a process and its children together seen while running (a thread samples
    every `interval_s`), so a server whose engine runs in a child process is measured whole."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_bytes(self.pid)
            if rss is not None:
                self.peak = max(self.peak or 0, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What every server is given: the model, threads, context per sequence and llama.cpp's
    extra-buffer mode (settings.llama_extra_buffers), so the comparison stays like for like."""

    model_path: Path
    n_threads: int
    n_ctx: int
    backend: str = "llama_cpp"  # localroute's local tier: llama_cpp, vllm or transformers
    extra_buffers: str = "auto"

    @property
    def use_extra_bufts(self) -> bool:
        from localroute.backends.cpu_features import extra_buffers_choice

        return extra_buffers_choice(self.extra_buffers).use_extra_bufts


@dataclass(slots=True)
class ManagedServer:
    """A server subprocess; `base_url` ends in /v1, `model` is what requests must name."""

    name: str
    argv: list[str]
    model: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    start_timeout_s: float = 180.0  # vLLM compiles and captures CUDA graphs before it answers
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout_s: float | None = None) -> None:
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendUnavailableError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise BackendUnavailableError(f"{self.name} did not answer within {timeout_s:g}s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-n:]

    def peak_rss(self) -> int | None:
        return rss_bytes(self.proc.pid, "VmHWM") if self.proc is not None else None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, then wait until every process of it is gone (a
        vLLM server's engine process can outlive its parent and still hold GPU memory that the
        next level's server needs); SIGKILL after `timeout_s`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        if self.proc is not None:
            _wait_group_gone(self.proc.pid, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_group_gone(pgid: int, timeout_s: float = 15.0) -> None:
    """Until no process of the group is left; SIGKILL to the rest after `timeout_s`, then give up
    after as long again (an unreaped zombie still counts as a member)."""
    for last_round in (False, True):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):  # gone, or no longer ours
                return
            time.sleep(0.05)
        if not last_round:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return


def localroute_server(spec: EngineSpec, parallel: int, isolation: str = "process") -> ManagedServer:
    """`localroute serve` with one local tier (the model), so nothing escalates: the engine's work
    is the same as the baselines'. Confidence is computed as in any cascade (per-token logprobs).
    `isolation` is settings.engine_isolation ("thread": the engine inside the server process)."""
    tier = {"name": "local", "kind": spec.backend, "model": str(spec.model_path)}
    port = free_port()
    env = {
        "LOCALROUTE_ENGINE_ISOLATION": isolation,
        "LOCALROUTE_TIERS": json.dumps([tier]),
        "LOCALROUTE_N_THREADS": str(spec.n_threads),
        "LOCALROUTE_N_CTX": str(spec.n_ctx),
        "LOCALROUTE_N_PARALLEL": str(parallel),
        "LOCALROUTE_MAX_QUEUE": str(max(64, parallel * 4)),
        "LOCALROUTE_LOG_LEVEL": "warning",
        "LOCALROUTE_LLAMA_EXTRA_BUFFERS": spec.extra_buffers,
    }
    argv = [sys.executable, "-m", "localroute", "serve", "--host", "127.0.0.1", "--port", str(port)]
    slow_start = spec.backend == "vllm"
    name = "localroute" if isolation == "process" else f"localroute-{isolation}"
    return ManagedServer(name, argv, "localroute/cascade", env, port, 900.0 if slow_start else 180.0)


def llama_cpp_python_server(spec: EngineSpec, parallel: int) -> ManagedServer:
    """llama-cpp-python's own OpenAI server (one request at a time; `parallel` is ignored), started
    through localroute.bench.llama_cpp_python_server so it loads with the same extra-buffer choice."""
    try:
        import llama_cpp.server  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--vs llama-cpp-python needs llama-cpp-python[server] ({exc.name} missing): "
                          "pip install 'localroute[dev]'") from None
    port = free_port()
    argv = [sys.executable, "-m", "localroute.bench.llama_cpp_python_server", "--model", str(spec.model_path),
            "--model_alias", "bench", "--n_threads", str(spec.n_threads), "--n_threads_batch", str(spec.n_threads),
            "--n_ctx", str(spec.n_ctx), "--host", "127.0.0.1", "--port", str(port)]
    env = {"LOCALROUTE_USE_EXTRA_BUFTS": "1" if spec.use_extra_bufts else "0"}
    return ManagedServer("llama-cpp-python", argv, "bench", env, port)


def require_vllm() -> None:
    """A clear ConfigError, with the install hint, where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--vs vllm needs vLLM, which runs on CUDA GPU hosts: pip install 'localroute[gpu]'",
                          param="vs")


def vllm_server(spec: EngineSpec, parallel: int) -> ManagedServer:
    """vLLM's own OpenAI server (a GPU host) with up to `parallel` sequences of n_ctx tokens."""
    require_vllm()
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model_path),
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
            "--max-num-seqs", str(parallel), "--max-model-len", str(spec.n_ctx), "--max-logprobs", "20"]
    return ManagedServer("vllm", argv, "bench", {}, port, 900.0)


def llama_server(binary: Path, spec: EngineSpec, parallel: int) -> ManagedServer:
    """llama.cpp's llama-server with `parallel` slots of n_ctx each; flash attention, the KV layout
    and the extra buffer types set as localroute's engine sets them (off; one KV stream per sequence;
    `--no-repack` where localroute's choice is off: llama-server repacks by default)."""
    if not binary.is_file():
        raise ConfigError(f"llama-server binary not found: {binary} (build it: scripts/build_llama_server.sh)",
                          param="vs")
    port = free_port()
    argv = [str(binary), "-m", str(spec.model_path), "-t", str(spec.n_threads), "-tb", str(spec.n_threads),
            "-np", str(parallel), "-c", str(spec.n_ctx * parallel), "-fa", "off", "--no-kv-unified",
            "--no-webui", "--host", "127.0.0.1", "--port", str(port), "-a", "bench"]
    if not spec.use_extra_bufts:
        argv.append("--no-repack")
    return ManagedServer("llama-server", argv, "bench", {}, port)
