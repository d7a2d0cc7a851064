"""The thin CLI, run as a subprocess like a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localroute.cli import main

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


def _mixed_run(run: Path, rng_seed: int = 0) -> Path:
    """An eval run (meta + rows, as `localroute eval` writes them) of two categories with a known
    link between confidence and correctness: `easy` is right when confident, `hard` rarely."""
    import numpy as np

    from localroute.evaluation.runs import append_rows, tokens_to_json, write_meta
    from tests.fakes import tokens

    run.mkdir()
    write_meta(run, {"tier": "cheap", "dataset": str(run / "missing.jsonl"), "frontier": {"mode": "oracle"},
                     "confidence_quantile_alpha": 0.1,
                     "fingerprint": {"model_file": "m.gguf", "model_sha256": "a" * 64, "template_sha256": "t" * 64}})
    rng = np.random.default_rng(rng_seed)
    with append_rows(run) as append:
        for cat, n in (("easy", 120), ("hard", 120), ("tiny", 8)):
            for i in range(n):
                conf = float(rng.uniform(-3, 0))
                right = bool(rng.uniform() < (0.95 if cat == "easy" else 0.2) * (1 + conf / 6))
                append({"id": f"{cat}-{i}", "task": "choice", "output": "x",
                        "tokens": tokens_to_json(tokens([conf])),
                        "cheap": {"score": float(right), "correct": right}, "frontier": {"score": 1.0}})
    return run


def test_calibrate_per_category_writes_certified_and_fallback_categories(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = _mixed_run(tmp_path / "run")
    out = tmp_path / "calibration.json"
    assert main(["calibrate", "--run", str(run), "--target-quality", "0.8", "--delta", "0.1", "--per-category",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "category tiny" in text and "POOLED" in text
    from localroute.calibration_file import load_calibration

    cats = load_calibration(out).tiers["cheap"].categories
    assert set(cats) == {"easy", "hard", "tiny"} and cats["tiny"].fallback is not None
    assert cats["easy"].certificate.delta == pytest.approx(0.05) and cats["easy"].fallback is None
    assert cats["easy"].threshold < cats["hard"].threshold  # the easy category keeps more local


def test_report_shows_live_quality_per_category_with_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from localroute.monitoring.record import RequestRecord
    from localroute.monitoring.routing_log import RoutingLog
    from localroute.monitoring.shadow import insert_pairs
    from localroute.routing.base import Decision, TierAttempt

    log = tmp_path / "routing.db"
    writer = RoutingLog(log)
    for i in range(40):
        d = Decision("localroute/cascade", "mean_logprob", [TierAttempt("cheap", -0.2, -1.0, True)], "cheap",
                     evidence={"category": "math"})
        writer.observe(RequestRecord(f"r{i}", "chat", "localroute/cascade", False, 200, time.perf_counter(), 0.1,
                                     decision=d))
    writer.close()
    insert_pairs(log, [(time.time(), f"r{i}", "math", "cheap", -0.2, -1.0, 1.0, "all", "scored", "numeric",
                        float(i % 4 != 0), int(i % 4 != 0), None, 0.001, 0.2) for i in range(40)])
    assert main(["report", "--log", str(log), "--json", "--plot", str(tmp_path / "plots")]) == 0
    summary = json.loads(capsys.readouterr().out)
    q = summary["live_quality"]["categories"]["math"]
    assert q["pairs"] == 40 and q["kept_agreement"] == pytest.approx(0.75)
    assert q["kept_interval"][0] < 0.75 < q["kept_interval"][1]
    assert any(p.endswith("live_quality.png") for p in summary["plots"])
    assert main(["report", "--log", str(log)]) == 0
    table = capsys.readouterr().out
    assert "math" in table and "75.0%" in table and "shadow draws     scored 40" in table
