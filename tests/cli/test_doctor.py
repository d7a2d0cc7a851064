"""`localroute doctor` on this machine (no GPU) and its JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from localroute.cli import main


def test_doctor_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["cpu"]["usable_cores"] >= 1 and env["cpu"]["model"]
    assert env["gpu"]["nvml"] in ("available", "unavailable")
    if env["gpu"]["nvml"] == "unavailable":
        assert env["gpu"]["reason"] and env["gpu"]["devices"] == []
    assert env["engines"]["llama_cpp"]["importable"] is True and env["engines"]["llama_cpp"]["version"]
    for name in ("vllm", "torch", "transformers"):
        assert isinstance(env["engines"][name]["importable"], bool)
    assert env["would_use"]["engine"] in ("llama_cpp", "vllm", "transformers")
    assert env["would_use"]["why"]


def test_doctor_does_not_import_heavy_engines() -> None:
    """In a fresh interpreter (in this one other tests have already imported the engines): doctor
    finds the engines without importing torch, vLLM or transformers."""
    heavy = ("torch", "vllm", "transformers")  # llama_cpp it loads: its system info is the report
    code = ("import sys\n"
            "from localroute.cli import main\n"
            "code = main(['doctor'])\n"
            f"print('IMPORTED:', sorted(m for m in {heavy!r} if m in sys.modules))\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "GPU/NVML" in done.stdout and "would use" in done.stdout and "llama_cpp" in done.stdout
    assert done.stdout.splitlines()[-1] == "IMPORTED: []", done.stdout


def test_doctor_prints_llama_cpp_cpu_features_and_the_extra_buffer_choice(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from localroute.backends.cpu_features import extra_buffers_choice, system_info

    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    features = next(line for line in lines if line.startswith("llama.cpp "))
    assert features.split(None, 1)[1] == system_info() and "CPU :" in features
    choice = next(line for line in lines if line.startswith("extra bufs "))
    auto = extra_buffers_choice("auto")
    assert f"{'on' if auto.use_extra_bufts else 'off'} (llama_extra_buffers=auto): {auto.reason}" in choice

    monkeypatch.setenv("LOCALROUTE_LLAMA_EXTRA_BUFFERS", "off")
    assert main(["doctor", "--json"]) == 0
    lc = json.loads(capsys.readouterr().out)["llama_cpp_cpu"]
    assert lc["mode"] == "off" and lc["use_extra_bufts"] is False and lc["reason"] == "llama_extra_buffers=off"
    assert isinstance(lc["amx_cpu_flags"], list) and lc["system_info"] == system_info()
