"""Per-category certified thresholds and the live quality interval (issue 19), checked by
simulation against a known truth: each category's P(cheap answer right | confidence) is a line, so
the true cascade quality of any threshold is known in closed form, and over many random runs the
share of runs in which some category's chosen threshold misses its target must stay <= delta.
Recalibration from the log (evaluation/from_log.py) is checked against the same truth in
test_from_log.py."""

from __future__ import annotations

import numpy as np
import pytest

from localroute.calibration_file import Certificate
from localroute.evaluation.thresholds import fit_categories
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

    return bool(violated <= binom.ppf(0.99, runs, DELTA))


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
