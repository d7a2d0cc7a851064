"""The thin CLI, run as a subprocess like a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# README, Configuration: gemma-3-270m is no default tier but a registry model anyone can add
LADDER_WITH_GEMMA = [{"name": "smollm2-135m", "model": "smollm2-135m"},
                     {"name": "gemma-3-270m", "model": "gemma-3-270m"}]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localroute", *args], capture_output=True, text=True, timeout=timeout)


def test_models_lists_tiers_and_presence() -> None:
    proc = cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["tier"] for r in rows] == ["smollm2-135m"]
    assert all(r["present"] for r in rows) and rows[0]["path"].endswith(".gguf")


def test_gemma_stays_a_registry_model_a_user_can_add_as_a_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALROUTE_TIERS", json.dumps(LADDER_WITH_GEMMA))
    rows = json.loads(cli("models", "--json").stdout)
    assert [(r["tier"], r["present"]) for r in rows] == [("smollm2-135m", True), ("gemma-3-270m", True)]


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALROUTE_FRONTIER_API_KEY", "sk-canary-123")
    proc = cli("config", "show")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["frontier_api_key"] == "**********" and "sk-canary-123" not in proc.stdout


@pytest.mark.slow
def test_ask_prints_answer_and_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALROUTE_N_CTX", "512")
    monkeypatch.setenv("LOCALROUTE_DEFAULT_THRESHOLD", "-100")
    proc = cli("ask", "Say hello.", "--json", "--max-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["answer"] and out["routing"]["tier"] == "smollm2-135m" and out["routing"]["escalated"] is False
    monkeypatch.setenv("LOCALROUTE_TIERS", json.dumps(LADDER_WITH_GEMMA))  # README: adding a tier
    human = cli("ask", "Say hello.", "--max-tokens", "4", "--model", "gemma-3-270m")
    assert human.returncode == 0 and "tier=gemma-3-270m" in human.stdout
