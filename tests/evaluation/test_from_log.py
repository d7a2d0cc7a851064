"""`calibrate --from-log` (evaluation/from_log.py, issue 19): thresholds refitted from the
routing log's shadow pairs keep the offline guarantee, checked by simulation against the known
truth of test_thresholds.py (violations no more often than delta, uniform and stratified draws),
and on a real routing log written by the writer (what is refused, kept or fallen back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localroute.calibration_file import Certificate
from localroute.evaluation.from_log import LogSample, certify_from_log
from localroute.settings import Settings
from tests.evaluation.test_thresholds import DELTA, TARGET, at_most_delta, draw, true_quality


def log_sample(rng: np.random.Generator, category: str, n_pop: int, floor: float,
               rates: dict[str, float], margin: float = 0.2) -> LogSample:
    """Traffic at threshold `floor`; accepted answers drawn at their stratum's rate ('all' alone:
    uniform; 'near'/'far': confidence within `margin` above the floor or not)."""
    conf, ok = draw(rng, category, n_pop)
    accepted = conf >= floor
    if "all" in rates:
        strata = np.array(["all"] * n_pop, dtype=object)
    else:
        strata = np.where(conf - floor < margin, "near", "far").astype(object)
    p = np.array([rates[s] for s in strata])
    drawn = accepted & (rng.uniform(0, 1, n_pop) < p)
    n_acc = {s: int(np.sum(accepted & (strata == s))) for s in rates}
    return LogSample(conf[drawn], ok[drawn], p[drawn], [str(s) for s in strata[drawn]], n_pop, n_acc, floor)


@pytest.mark.parametrize("rates", [{"all": 0.3}, {"near": 0.8, "far": 0.15}])
def test_recalibration_from_shadow_pairs_violates_no_more_often_than_delta(rates: dict[str, float]) -> None:
    rng = np.random.default_rng(7)
    runs, violated, moved = 400, 0, 0
    for _ in range(runs):
        for c in ("medium", "hard"):
            fitted = certify_from_log(log_sample(rng, c, 3000, 0.1, rates), TARGET, DELTA / 2)
            assert fitted.threshold >= 0.1  # never below what the traffic was served at
            moved += fitted.threshold < 1e9
            if true_quality(c, fitted.threshold) < TARGET:
                violated += 1
                break
    assert at_most_delta(violated, runs), violated
    assert moved > runs  # it does certify real thresholds, not only "escalate everything"


# ---------- calibrate --from-log on a real routing log (review of issues 18/19) ----------


def _log_with_pairs(tmp_path: Path, confs: list[float], agrees: list[bool], threshold: float = -1.0,
                    signal: str = "mean_logprob", policy: str = "localroute/cascade",
                    pair_threshold: float | None = None) -> Path:
    import time

    from localroute.monitoring.record import RequestRecord
    from localroute.monitoring.routing_log import RoutingLog
    from localroute.monitoring.shadow import insert_pairs
    from localroute.routing.base import Decision, TierAttempt

    log = tmp_path / "routing.db"
    writer = RoutingLog(log)
    for i, conf in enumerate(confs):
        d = Decision(policy, signal, [TierAttempt("local", conf, threshold, True)], "local",
                     evidence={"category": "math"})
        writer.observe(RequestRecord(f"r{i}", "chat", policy, False, 200, time.perf_counter(), 0.1, decision=d))
    writer.close()
    pt = threshold if pair_threshold is None else pair_threshold
    insert_pairs(log, [(time.time(), f"r{i}", "math", "local", conf, pt, 1.0, "all", "scored", "numeric",
                        float(ok), int(ok), None, 0.0, 0.1) for i, (conf, ok) in enumerate(zip(confs, agrees))])
    return log


def _cal_file(path: Path, pooled: float, categories: dict[str, float], aggregator: str = "mean_logprob",
              alpha: float = 0.1) -> None:
    from localroute.calibration_file import (
        CalibrationFile,
        CategoryCalibration,
        TierCalibration,
        model_fingerprint,
        write_calibration,
    )

    fp = model_fingerprint(None, None, "local")
    cert = Certificate(target="quality", target_value=0.9, delta=0.05, n_calibration=40, n_holdout=0)
    entry = TierCalibration(threshold=pooled, template_sha256=fp["template_sha256"], remote_model="local",
                            certificate=cert, confidence_quantiles={}, confidence_histogram={}, n=40,
                            categories={c: CategoryCalibration(threshold=t, certificate=cert, n=40)
                                        for c, t in categories.items()})
    write_calibration(CalibrationFile(created_at="2026-12-03T00:00:00+00:00", aggregator=aggregator, alpha=alpha,
                                      tiers={"local": entry}), path)


def _settings(**kw: Any) -> Settings:
    return Settings(**({"confidence_aggregator": "mean_logprob"} | kw))


@pytest.mark.parametrize("earlier", [None, -0.5])
def test_nothing_certifiable_from_the_log_is_no_escalate_all_certificate(tmp_path: Path, earlier: float | None) -> None:
    """Every shadowed answer disagrees: no threshold reaches the target. That must not be stored as a
    certified 1e9 (applied, it would stop all shadowing and stay for good): the earlier certified
    threshold stays, or the category falls back to the pooled one, flagged."""
    from localroute.calibration_file import (
        calibrated_category_thresholds,
        load_calibration,
        model_fingerprint,
    )
    from localroute.evaluation.from_log import calibrate_from_log

    confs = [-0.9 + 0.8 * i / 59 for i in range(60)]
    log = _log_with_pairs(tmp_path, confs, [False] * 60)
    cal = tmp_path / "calibration.json"
    _cal_file(cal, -1.0, {} if earlier is None else {"math": earlier})
    out = calibrate_from_log(log, cal, _settings(), 0.99, 0.1, min_category_rows=30)  # even 1 kept of 60 fails
    refit = out["tiers"]["local"]["math"]
    assert not refit["escalate_all"]
    stored = load_calibration(cal).tiers["local"].categories["math"]
    assert stored.threshold < 1e9
    fp = {"local": model_fingerprint(None, None, "local")}
    served = calibrated_category_thresholds(cal, "mean_logprob", 0.1, fp).get("local", {})
    if earlier is None:
        assert refit["fallback"] and "certifiable" in refit["fallback"] and stored.fallback is not None
        assert "math" not in served
    else:
        assert "certifiable" in refit["kept"] and served["math"] == earlier
    assert out["certified"] == 0


def test_the_floor_is_the_pairs_own_threshold_not_the_highest_ever_logged() -> None:
    from localroute.evaluation.from_log import log_samples

    def row(threshold: float, conf: float) -> dict:  # type: ignore[type-arg]
        return {"status": 200, "tier": "local", "policy": "localroute/cascade", "signal": "mean_logprob",
                "evidence": {"category": "math"},
                "attempts": [{"tier": "local", "threshold": threshold, "confidence": conf, "accepted": conf >= threshold}]}

    rows = [row(1e9, -0.5)] + [row(-1.0, -0.5) for _ in range(5)]
    pairs = [{"tier": "local", "category": "math", "status": "scored", "label": 1, "confidence": -0.5,
              "threshold": -1.0, "sample_rate": 1.0, "stratum": "all"} for _ in range(5)]
    sample = log_samples(rows, pairs, 0.2)[("local", "math")]
    assert sample.floor == -1.0


def test_from_log_fits_only_rows_of_the_aggregator_and_a_cascade_policy(tmp_path: Path) -> None:
    """A verifier's P(yes) rows (0..1) are no evidence for a mean_logprob threshold: with only those
    in the log there is nothing to refit."""
    from localroute.errors import ConfigError
    from localroute.evaluation.from_log import calibrate_from_log, fitted_row

    confs = [0.5 + 0.5 * i / 59 for i in range(60)]
    log = _log_with_pairs(tmp_path, confs, [True] * 60, threshold=0.5, signal="verifier", policy="localroute/verified")
    cal = tmp_path / "calibration.json"
    _cal_file(cal, -1.0, {})
    with pytest.raises(ConfigError, match="no cascade requests on mean_logprob"):
        calibrate_from_log(log, cal, _settings(), 0.9, 0.1, min_category_rows=30)
    assert fitted_row({"policy": "localroute/embedding", "signal": "embedding>mean_logprob"}, "mean_logprob")
    assert not fitted_row({"policy": "localroute/cascade", "signal": "label_confidence"}, "mean_logprob")


def test_from_log_refuses_a_calibration_file_of_another_aggregator(tmp_path: Path) -> None:
    from localroute.errors import ConfigError
    from localroute.evaluation.from_log import calibrate_from_log

    confs = [-0.9 + 0.8 * i / 59 for i in range(60)]
    log = _log_with_pairs(tmp_path, confs, [True] * 60)
    cal = tmp_path / "calibration.json"
    _cal_file(cal, -1.0, {}, aggregator="min_logprob")
    with pytest.raises(ConfigError, match="min_logprob"):
        calibrate_from_log(log, cal, _settings(), 0.9, 0.1, min_category_rows=30)
    _cal_file(cal, -1.0, {}, alpha=0.2)
    with pytest.raises(ConfigError, match="alpha"):
        calibrate_from_log(log, cal, _settings(), 0.9, 0.1, min_category_rows=30)
