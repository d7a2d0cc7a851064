"""Per-category certified thresholds and recalibration from the log (issue 19), checked by
simulation against a known truth: each category's P(cheap answer right | confidence) is a line, so
the true cascade quality of any threshold is known in closed form, and over many random runs the
share of runs in which some category's chosen threshold misses its target must stay <= delta."""

from __future__ import annotations

import numpy as np
import pytest

from localroute.calibration_file import Certificate
from localroute.evaluation.thresholds import LogSample, certify_from_log, fit_categories
from localroute.monitoring.log_report import live_quality

# category -> (a, b): P(right | conf) = a + b * conf, conf ~ U(0, 1)
TRUTH = {"easy": (0.9, 0.1), "medium": (0.6, 0.4), "hard": (0.2, 0.6)}
TARGET, DELTA = 0.9, 0.1


def true_quality(category: str, t: float) -> float:
    """Cascade quality (frontier = gold) at threshold t: 1 - E[kept and wrong]."""
    a, b = TRUTH[category]
    t = min(max(t, 0.0), 1.0)
    return 1 - ((1 - a) * (1 - t) - b * (1 - t * t) / 2)


def draw(rng: np.random.Generator, category: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = TRUTH[category]
    conf = rng.uniform(0, 1, n)
    return conf, (rng.uniform(0, 1, n) < a + b * conf).astype(np.float64)


def mixed(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confs, labels, cats = [], [], []
    for c in TRUTH:
        conf, ok = draw(rng, c, n)
        confs.append(conf)
        labels.append(ok)
        cats += [c] * n
    return np.concatenate(confs), np.concatenate(labels), np.array(cats, dtype=object)


def at_most_delta(violated: int, runs: int) -> bool:
    """Whether `violated` of `runs` is consistent with a violation rate <= DELTA: below the 99th
    percentile of Binomial(runs, DELTA). The bound is nearly tight (a threshold just past the true
    boundary passes its test with probability close to its delta), so a realised rate a little over
    DELTA is sampling noise; a procedure without the guarantee is far above (checked below)."""
    from scipy.stats import binom

    return violated <= binom.ppf(0.99, runs, DELTA)


POOLED = Certificate(target="quality", target_value=TARGET, n_calibration=0, n_holdout=0)


def fit(conf: np.ndarray, cheap: np.ndarray, cats: np.ndarray, min_rows: int = 30, seed: int = 0):  # type: ignore[no-untyped-def]
    return fit_categories(conf, cheap, np.ones_like(cheap), cats, 0.5, POOLED, holdout=0.0, seed=seed,
                          oracle=True, target_quality=TARGET, target_escalation=None, delta=DELTA, min_rows=min_rows)


def test_per_category_thresholds_violate_no_more_often_than_delta() -> None:
    rng = np.random.default_rng(19)
    runs, violated = 300, 0
    naive_violated = 0
    for run in range(runs):
        conf, cheap, cats = mixed(rng, 300)
        result = fit(conf, cheap, cats, seed=run)
        if any(true_quality(c, result[c].threshold) < TARGET for c in TRUTH):
            violated += 1
        # the same data with no guarantee: the lowest threshold whose empirical quality reaches the target
        for c in TRUTH:
            rows = cats == c
            order = np.sort(conf[rows])
            ok = [t for t in order if 1 - np.mean((conf[rows] >= t) * (1 - cheap[rows])) >= TARGET]
            if ok and true_quality(c, min(ok)) < TARGET:
                naive_violated += 1
                break
    assert at_most_delta(violated, runs), violated
    assert naive_violated / runs > 3 * DELTA  # the check can fail: an uncertified fit violates often


def test_categories_get_their_own_thresholds_and_delta_is_split() -> None:
    conf, cheap, cats = mixed(np.random.default_rng(1), 2000)
    result = fit(conf, cheap, cats)
    assert result["easy"].threshold < result["medium"].threshold < result["hard"].threshold
    assert all(result[c].certificate.delta == pytest.approx(DELTA / 3) for c in TRUTH)
    assert all(result[c].fallback is None for c in TRUTH)


def test_a_small_category_falls_back_to_the_pooled_threshold_and_says_so() -> None:
    rng = np.random.default_rng(2)
    conf, cheap, cats = mixed(rng, 200)
    small_conf, small_ok = draw(rng, "hard", 10)
    conf, cheap = np.concatenate([conf, small_conf]), np.concatenate([cheap, small_ok])
    cats = np.concatenate([cats, np.array(["tiny"] * 10, dtype=object)])
    result = fit(conf, cheap, cats)
    assert result["tiny"].threshold == 0.5 and result["tiny"].certificate is POOLED
    assert "10 rows < 30" in (result["tiny"].fallback or "")
    assert result["easy"].certificate.delta == pytest.approx(DELTA / 3)  # the fallback takes no share


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


def test_live_quality_interval_covers_the_true_quality_at_the_stated_rate() -> None:
    rng = np.random.default_rng(3)
    level, runs, covered = 0.9, 400, 0
    a, b = TRUTH["medium"]
    floor = 0.3
    true_kept = a + b * (1 + floor) / 2  # P(right | conf >= floor), conf uniform
    for _ in range(runs):
        conf, ok = draw(rng, "medium", 400)
        rows = [{"status": 200, "tier": "local" if c >= floor else "frontier", "escalated": int(c < floor),
                 "evidence": {"category": "medium"},
                 "attempts": [{"tier": "local", "accepted": bool(c >= floor), "threshold": floor}]} for c in conf]
        pairs = [{"category": "medium", "status": "scored", "label": int(o), "sample_rate": 0.25, "cost_usd": 0.0}
                 for c, o in zip(conf, ok, strict=True) if c >= floor and rng.uniform() < 0.25]
        q = live_quality(rows, pairs, {"medium": TARGET}, level)["categories"]["medium"]
        lo, hi = q["kept_interval"]
        covered += lo <= true_kept <= hi
    assert covered / runs >= level - 0.03  # Clopper-Pearson is conservative: >= level up to noise


def test_live_quality_flags_a_category_below_target() -> None:
    rows = [{"status": 200, "tier": "local", "escalated": 0, "evidence": {"category": "bad"},
             "attempts": [{"tier": "local", "accepted": True, "threshold": -1.0}]}] * 100
    pairs = [{"category": "bad", "status": "scored", "label": i % 2, "sample_rate": 0.5, "cost_usd": 0.001}
             for i in range(50)]
    live = live_quality(rows, pairs, {"*": 0.9})
    assert live["below_target"] == ["bad"] and live["categories"]["bad"]["target"] == 0.9
    assert live["shadow_cost_usd"] == pytest.approx(0.05)


# ---------- calibrate --from-log on a real routing log (review of issues 18/19) ----------


def _log_with_pairs(tmp_path, confs, agrees, threshold=-1.0, signal="mean_logprob", policy="localroute/cascade",
                    pair_threshold=None):  # type: ignore[no-untyped-def]
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


def _cal_file(path, pooled, categories, aggregator="mean_logprob", alpha=0.1):  # type: ignore[no-untyped-def]
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


def _settings(**kw):  # type: ignore[no-untyped-def]
    from localroute.settings import Settings

    return Settings(**({"confidence_aggregator": "mean_logprob"} | kw))


@pytest.mark.parametrize("earlier", [None, -0.5])
def test_nothing_certifiable_from_the_log_is_no_escalate_all_certificate(tmp_path, earlier) -> None:  # type: ignore[no-untyped-def]
    """Every shadowed answer disagrees: no threshold reaches the target. That must not be stored as a
    certified 1e9 (applied, it would stop all shadowing and stay for good): the earlier certified
    threshold stays, or the category falls back to the pooled one, flagged."""
    from localroute.calibration_file import (
        calibrated_category_thresholds,
        load_calibration,
        model_fingerprint,
    )
    from localroute.evaluation.thresholds import calibrate_from_log

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
    from localroute.evaluation.thresholds import log_samples

    def row(threshold: float, conf: float) -> dict:  # type: ignore[type-arg]
        return {"status": 200, "tier": "local", "policy": "localroute/cascade", "signal": "mean_logprob",
                "evidence": {"category": "math"},
                "attempts": [{"tier": "local", "threshold": threshold, "confidence": conf, "accepted": conf >= threshold}]}

    rows = [row(1e9, -0.5)] + [row(-1.0, -0.5) for _ in range(5)]
    pairs = [{"tier": "local", "category": "math", "status": "scored", "label": 1, "confidence": -0.5,
              "threshold": -1.0, "sample_rate": 1.0, "stratum": "all"} for _ in range(5)]
    sample = log_samples(rows, pairs, 0.2)[("local", "math")]
    assert sample.floor == -1.0


def test_from_log_fits_only_rows_of_the_aggregator_and_a_cascade_policy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A verifier's P(yes) rows (0..1) are no evidence for a mean_logprob threshold: with only those
    in the log there is nothing to refit."""
    from localroute.errors import ConfigError
    from localroute.evaluation.thresholds import calibrate_from_log, fitted_row

    confs = [0.5 + 0.5 * i / 59 for i in range(60)]
    log = _log_with_pairs(tmp_path, confs, [True] * 60, threshold=0.5, signal="verifier", policy="localroute/verified")
    cal = tmp_path / "calibration.json"
    _cal_file(cal, -1.0, {})
    with pytest.raises(ConfigError, match="no cascade requests on mean_logprob"):
        calibrate_from_log(log, cal, _settings(), 0.9, 0.1, min_category_rows=30)
    assert fitted_row({"policy": "localroute/embedding", "signal": "embedding>mean_logprob"}, "mean_logprob")
    assert not fitted_row({"policy": "localroute/cascade", "signal": "label_confidence"}, "mean_logprob")


def test_from_log_refuses_a_calibration_file_of_another_aggregator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from localroute.errors import ConfigError
    from localroute.evaluation.thresholds import calibrate_from_log

    confs = [-0.9 + 0.8 * i / 59 for i in range(60)]
    log = _log_with_pairs(tmp_path, confs, [True] * 60)
    cal = tmp_path / "calibration.json"
    _cal_file(cal, -1.0, {}, aggregator="min_logprob")
    with pytest.raises(ConfigError, match="min_logprob"):
        calibrate_from_log(log, cal, _settings(), 0.9, 0.1, min_category_rows=30)
    _cal_file(cal, -1.0, {}, alpha=0.2)
    with pytest.raises(ConfigError, match="alpha"):
        calibrate_from_log(log, cal, _settings(), 0.9, 0.1, min_category_rows=30)
