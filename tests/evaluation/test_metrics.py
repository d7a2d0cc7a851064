"""Routing metrics against values computed by hand on tiny tables."""

from __future__ import annotations

import numpy as np
import pytest

from localroute.evaluation.metrics import (
    as_probability,
    auroc,
    curve_metrics,
    deferral_curve,
    ece,
    oracle_curve,
    random_curve,
    routing_metrics,
)

CONF = np.array([0.9, 0.8, 0.7, 0.6])
CHEAP = np.array([1.0, 0.0, 1.0, 0.0])
FRONTIER = np.array([1.0, 1.0, 1.0, 0.0])
CORRECT = CHEAP.astype(bool)


def test_auroc_by_hand() -> None:
    # correct {0.9, 0.7} vs wrong {0.8, 0.6}: 3 of 4 pairs ordered right
    assert auroc(CONF, CORRECT) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)  # a tie counts half
    assert auroc(CONF, np.ones(4, dtype=bool)) is None


def test_ece_by_hand() -> None:
    # one item per bin: (|.9-1| + |.8-0| + |.7-1| + |.6-0|) / 4
    assert ece(CONF, CORRECT) == pytest.approx(0.45)
    assert ece(np.array([0.75, 0.75, 0.75, 0.75]), np.array([True, True, True, False])) == pytest.approx(0.0)


def test_deferral_random_oracle_curves_by_hand() -> None:
    # escalate least confident first: 0.6 (no gain), 0.7 (no gain), 0.8 (gain 1), 0.9
    assert deferral_curve(CONF, CHEAP, FRONTIER) == pytest.approx([0.5, 0.5, 0.5, 0.75, 0.75])
    assert oracle_curve(CHEAP, FRONTIER) == pytest.approx([0.5, 0.75, 0.75, 0.75, 0.75])
    assert random_curve(CHEAP, FRONTIER) == pytest.approx([0.5, 0.5625, 0.625, 0.6875, 0.75])


def test_ties_are_expected_over_random_order() -> None:
    curve = deferral_curve(np.array([0.5, 0.5]), np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    assert curve == pytest.approx([0.5, 0.75, 1.0])


def test_auc_apgr_cpt_by_hand() -> None:
    m = curve_metrics(deferral_curve(CONF, CHEAP, FRONTIER), 0.5, 0.75)
    assert m["auc"] == pytest.approx(0.59375)
    # PGR = [0, 0, 0, 1, 1] at x = 0, .25, .5, .75, 1
    assert m["apgr"] == pytest.approx(0.375)
    assert (m["cpt50"], m["cpt80"], m["cpt95"]) == (0.75, 0.75, 0.75)
    rnd = curve_metrics(random_curve(CHEAP, FRONTIER), 0.5, 0.75)
    assert rnd["apgr"] == pytest.approx(0.5)
    assert rnd["cpt50"] == pytest.approx(0.5)
    orc = curve_metrics(oracle_curve(CHEAP, FRONTIER), 0.5, 0.75)
    assert orc["cpt95"] == pytest.approx(0.25)


def test_no_gap_means_undefined_pgr() -> None:
    m, _ = routing_metrics(CONF, FRONTIER, FRONTIER, FRONTIER.astype(bool), "mean_logprob")
    assert m.apgr is None and m.cpt95 is None


def test_probability_reading() -> None:
    assert as_probability(np.array([0.0, np.log(0.5)]), "mean_logprob") == pytest.approx([1.0, 0.5])
    assert as_probability(np.array([0.0]), "mean_margin") == pytest.approx([0.5])
    assert as_probability(np.array([-np.inf]), "sum_logprob") == pytest.approx([0.0])


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_rows() -> None:
    from localroute.evaluation.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)

    def widths(n: int) -> dict[str, float]:
        correct = rng.random(n) < 0.5
        conf = correct + rng.normal(0, 1.0, n)  # a useful but noisy signal
        cheap = correct.astype(float)
        ci = bootstrap_intervals(conf, cheap, np.ones(n), correct, n_boot=300)
        a = auroc(conf, correct)
        assert ci["auroc"] is not None and ci["auroc"][0] <= a <= ci["auroc"][1]
        return {k: v[1] - v[0] for k, v in ci.items() if v is not None}

    small, large = widths(40), widths(800)
    assert large["auroc"] < small["auroc"] and large["apgr"] < small["apgr"]
    none = bootstrap_intervals(np.zeros(5), np.ones(5), np.ones(5), np.ones(5, dtype=bool), n_boot=50)
    assert none["auroc"] is None and none["apgr"] is None  # all right: no AUROC, no gap to recover


def test_the_paired_auroc_difference_cancels_what_two_signals_share() -> None:
    from localroute.evaluation.metrics import bootstrap_intervals, paired_auroc_delta

    rng = np.random.default_rng(3)
    n = 300
    correct = rng.random(n) < 0.5
    shared = rng.normal(0, 1.0, n)  # what both signals see (how hard each row is)
    base = correct * 0.5 + shared
    better = correct * 0.6 + shared  # the same noise, a little more signal
    same = paired_auroc_delta(base, base, correct, n_boot=200)
    assert same is not None and same[0] == 0.0 and same[1] == (0.0, 0.0)
    found = paired_auroc_delta(better, base, correct, n_boot=300)
    assert found is not None
    delta, (low, high) = found
    assert delta == pytest.approx(auroc(better, correct) - auroc(base, correct))
    assert 0 < low <= delta <= high  # a difference the two separate intervals would not show
    sep = bootstrap_intervals(base, correct.astype(float), np.ones(n), correct, n_boot=300)["auroc"]
    assert sep is not None and auroc(better, correct) < sep[1]
    assert paired_auroc_delta(base, base, np.ones(n, dtype=bool)) is None  # no wrong answer: no AUROC
