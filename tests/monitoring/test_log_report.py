"""`localroute report` against a hand-built routing log with known answers, compared with a
calibration file that `localroute calibrate` wrote from a small real eval run."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localroute.calibration_file import load_calibration
from localroute.cli import main
from localroute.cli.report import parse_time
from localroute.errors import ConfigError
from localroute.monitoring.log_report import escalation_health, read_calibration, read_rows, report, summarize
from localroute.monitoring.routing_log import COLUMNS, RoutingLog
from tests.conftest import SENTIMENT_FIXTURE, local_settings

DAY = 86400
T0 = (1_750_000_000 // DAY) * DAY + 10 * 3600  # 10:00 UTC on some day


def _row(ts: float, status: int, tier: str | None, escalated: int | None, attempts: list[dict[str, Any]],
         cost: float | None, cf: float | None, latency: float, ttft: float | None = None,
         energy: float | None = None, util: float | None = None) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(ts=ts, request_id=f"r{ts}", endpoint="chat", policy="localroute/cascade", stream=0, status=status,
               tier=tier, escalated=escalated, attempts=json.dumps(attempts), cost_usd=cost,
               counterfactual_cost_usd=cf, latency_s=latency, ttft_s=ttft, energy_j=energy,
               gpu_utilization_ratio=util, disconnected=0, error=None if status == 200 else "invalid_request_error")
    return row


ROWS = [
    _row(T0, 200, "cheap", 0, [{"tier": "cheap", "confidence": -0.2}], 0.001, 0.010, 1.0, 0.5, energy=10.0,
         util=0.5),
    _row(T0 + 60, 200, "frontier", 1, [{"tier": "cheap", "confidence": -2.0}, {"tier": "frontier", "confidence": None}],
         0.012, 0.010, 3.0, energy=5.0, util=0.3),
    _row(T0 + 120, 200, "cheap", 0, [{"tier": "cheap", "confidence": -0.4}], 0.001, 0.010, 2.0),
    _row(T0 + DAY, 200, "cheap", 0, [{"tier": "cheap", "confidence": -0.3}], 0.002, 0.020, 4.0),
    _row(T0 + DAY + 10, 400, None, None, [], None, None, 0.1),
]


@pytest.fixture()
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "log.db"
    RoutingLog(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executemany(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                     [tuple(r[c] for c in COLUMNS) for r in ROWS])
    conn.close()
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file `localroute calibrate` writes, from a real eval run (SmolLM2 over 8 items of the
    committed fixture set) of a tier named `cheap`, like the log's first tier."""
    from localroute.evaluation.runner import EvalConfig, run_eval

    root = tmp_path_factory.mktemp("calibration")
    run, path = root / "run", root / "calibration.json"
    settings = local_settings(tiers=[{"name": "cheap", "model": "smollm2-135m"}])
    done = asyncio.run(run_eval(settings, EvalConfig(dataset=SENTIMENT_FIXTURE, out_dir=run, limit=8, max_tokens=4,
                                                     progress=False)))
    assert done.computed == 8 and done.errors == 0
    assert main(["calibrate", "--run", str(run), "--target-escalation", "0.25", "--holdout", "0",
                 "--aggregator", "mean_logprob", "--out", str(path), "--json"]) == 0
    return path


@pytest.mark.slow
def test_summary_numbers(log_path: Path, calibration: Path) -> None:
    rows = read_rows(log_path)
    s = summarize(rows, "day", read_calibration(calibration))
    assert s["requests"] == 5 and s["answered"] == 4 and s["errors"] == 1
    assert s["escalation_rate"] == pytest.approx(0.25) and s["escalation_health"] == "healthy"
    assert s["answered_by_tier"] == {"cheap": 3, "frontier": 1}
    assert s["cost_usd"] == pytest.approx(0.016)
    assert s["cost_per_query_usd"] == pytest.approx(0.004)
    assert s["counterfactual_cost_usd"] == pytest.approx(0.05)
    assert s["savings_pct"] == pytest.approx(68.0)
    assert s["latency_s"]["p50"] == pytest.approx(2.5)
    assert s["ttft_s"]["p50"] == pytest.approx(0.5)
    assert s["energy_j"] == pytest.approx(15.0) and s["gpu_utilization_mean"] == pytest.approx(0.4)
    cheap = s["confidence"]["cheap"]
    assert cheap["n"] == 4 and cheap["p50"] == pytest.approx(-0.35)
    # the drift figures compare the log with what calibrate recorded, read back as `serve` reads it
    written = load_calibration(calibration).tiers["cheap"].confidence_quantiles
    assert cheap["calibration"] == {f"p{int(k[1:])}": v for k, v in written.items()}
    assert {"p1", "p10", "p50", "p99"} <= set(cheap["calibration"])
    assert cheap["median_shift"] == pytest.approx(-0.35 - written["p50"])
    logged = [-0.2, -2.0, -0.4, -0.3]  # the cheap tier's confidences in ROWS
    assert cheap["share_below_calibration_p10"] == pytest.approx(np.mean([c < written["p10"] for c in logged]))
    assert "frontier" not in s["confidence"]  # no confidence recorded for it
    day1, day2 = s["series"]
    assert day1["requests"] == 3 and day1["escalation_rate"] == pytest.approx(1 / 3)
    assert day1["cost_per_query_usd"] == pytest.approx(0.014 / 3)
    assert day2["requests"] == 2 and day2["escalation_rate"] == 0.0 and day2["cost_per_query_usd"] == 0.002
    hourly = summarize(rows, "hour")
    assert len(hourly["series"]) == 2  # 10:00 on both days


def test_health_band_flags() -> None:
    assert escalation_health(0.6) == "too_conservative"
    assert escalation_health(0.02) == "too_permissive"
    assert escalation_health(0.10) == "outside_band"
    assert escalation_health(0.40) == "outside_band"
    assert escalation_health(0.15) == "healthy"
    assert escalation_health(None) == "no_data"


def test_a_broken_calibration_file_is_a_clear_error(log_path: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`report` reads the calibration file as `serve` does (calibration_file.load_calibration): a
    file calibrate did not write is an error naming the file and the problem, not an empty section."""
    junk = tmp_path / "junk.json"
    junk.write_text("not json [[[")
    hand_made = tmp_path / "hand.json"  # a plausible shape, but not the calibration file's
    hand_made.write_text(json.dumps({"tiers": {"cheap": {"confidence_quantiles": {"p50": -0.5}}}}))
    for path, why in ((junk, "cannot read calibration file"), (hand_made, "invalid calibration file"),
                      (tmp_path / "missing.json", "calibration file not found")):
        with pytest.raises(ConfigError, match=why):
            report(log_path, calibration_path=path)
        assert main(["report", "--log", str(log_path), "--calibration", str(path)]) == 2
        err = capsys.readouterr().err
        assert why in err and str(path) in err
    assert read_calibration(None) is None


def test_a_configured_calibration_not_yet_written_is_no_comparison(log_path: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOCALROUTE_CALIBRATION_PATH", str(tmp_path / "later.json"))
    assert main(["report", "--log", str(log_path), "--json"]) == 0
    assert "calibration" not in json.loads(capsys.readouterr().out)["confidence"]["cheap"]
    (tmp_path / "later.json").write_text("{}")  # once there, it is read, and must be valid
    assert main(["report", "--log", str(log_path), "--json"]) == 2
    assert "invalid calibration file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_json(log_path: Path, calibration: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--log", str(log_path), "--json", "--calibration", str(calibration)]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("requests", "escalation_rate", "cost_usd", "counterfactual_cost_usd", "savings_pct"):
        assert key in data
    assert data["requests"] == 5 and data["savings_pct"] == pytest.approx(68.0)
    written = load_calibration(calibration).tiers["cheap"].confidence_quantiles
    assert data["confidence"]["cheap"]["calibration"]["p50"] == written["p50"]  # --calibration was read
    # a window: only the second day
    since = str(T0 + DAY - 3600)
    assert main(["report", "--log", str(log_path), "--json", "--since", since]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 2


def test_cli_table_and_plots(log_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots"
    assert main(["report", "--log", str(log_path), "--plot", str(out), "--bucket", "hour"]) == 0
    text = capsys.readouterr().out
    assert "25.0%" in text and "healthy" in text and "68.0%" in text
    for name in ("escalation_rate.png", "cost_per_query.png", "confidence_histograms.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_cli_errors_are_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--log", str(tmp_path / "nope.db")]) == 2
    assert "not found" in capsys.readouterr().err
    RoutingLog(tmp_path / "empty.db").close()
    assert main(["report", "--log", str(tmp_path / "empty.db"), "--since", "yesterday-ish"]) == 2


def test_parse_time() -> None:
    assert parse_time("24h", now=100_000.0) == pytest.approx(100_000.0 - 86400)
    assert parse_time("30m", now=10_000.0) == pytest.approx(10_000.0 - 1800)
    assert parse_time("2025-06-01") == pytest.approx(1748736000.0)
    assert parse_time("2025-06-01T01:00:00+01:00") == pytest.approx(1748736000.0)
    assert parse_time("1748736000") == 1748736000.0


def test_report_lists_the_review_sample(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localroute.monitoring.feedback import FeedbackRequest, FeedbackStore

    store = FeedbackStore(log_path)
    for rid in (f"r{T0}", f"r{T0 + 60}", f"r{T0 + 120}"):
        store.mark_review(rid, "localroute/cascade", "cheap")
    store.add(FeedbackRequest(request_id=f"r{T0 + 60}", correct=True, source="human"))
    assert main(["report", "--log", str(log_path), "--json"]) == 0
    review = json.loads(capsys.readouterr().out)["review"]
    assert (review["sampled"], review["reviewed"], review["pending"]) == (3, 1, 2)
    assert sorted(review["pending_request_ids"]) == sorted([f"r{T0}", f"r{T0 + 120}"])
    assert main(["report", "--log", str(log_path)]) == 0
    text = capsys.readouterr().out
    assert "review sample: 3 marked, 1 reviewed, 2 awaiting feedback" in text and f"r{T0 + 120}" in text
