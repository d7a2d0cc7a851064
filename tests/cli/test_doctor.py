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


def test_doctor_reports_a_calibration_file_of_another_aggregator(tmp_path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The file `serve` would ignore for its aggregator is named by doctor, text and JSON, with the fixes."""
    from localroute.calibration_file import write_calibration
    from tests.test_calibration_file import _file

    path = write_calibration(_file(aggregator="mean_logprob"), tmp_path / "calibration.json")
    monkeypatch.setenv("LOCALROUTE_CALIBRATION_PATH", str(path))
    monkeypatch.setenv("LOCALROUTE_CONFIDENCE_AGGREGATOR", "label_confidence")
    assert main(["doctor", "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert cal["applies"] is False and cal["aggregator"] == "mean_logprob"
    assert cal["configured_aggregator"] == "label_confidence" and "recalibrate" in cal["problem"]
    assert main(["doctor"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("calibration"))
    assert "IGNORED" in line and str(path) in line and 'confidence_aggregator = "mean_logprob"' in line
    monkeypatch.setenv("LOCALROUTE_CONFIDENCE_AGGREGATOR", "mean_logprob")
    assert main(["doctor"]) == 0
    assert "applies (aggregator mean_logprob)" in capsys.readouterr().out
