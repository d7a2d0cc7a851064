"""Confidence aggregators against hand-computed values."""

from __future__ import annotations

import math

import pytest

from localroute.routing import confidence as c
from localroute.types import TokenLogprob, TopLogprob


def tok(lp: float, *alts: float) -> TokenLogprob:
    return TokenLogprob(0, "t", lp, None, tuple(TopLogprob("a", a) for a in alts))


TOKS = [tok(-0.1, -0.1, -2.0), tok(-1.0, -1.0, -1.5), tok(-0.5, -0.5, -0.6)]


def test_chow_sum_and_average() -> None:
    assert c.sum_logprob(TOKS) == pytest.approx(-1.6)
    assert c.mean_logprob(TOKS) == pytest.approx(-1.6 / 3)


def test_min_and_quantile() -> None:
    assert c.min_logprob(TOKS) == pytest.approx(-1.0)
    assert c.quantile_logprob(TOKS, 0.0) == pytest.approx(-1.0)
    assert c.quantile_logprob(TOKS, 0.5) == pytest.approx(-0.5)
    assert c.quantile_logprob(TOKS, 0.25) == pytest.approx(-0.75)


def test_margin_uses_top_two() -> None:
    assert c.mean_margin(TOKS) == pytest.approx((1.9 + 0.5 + 0.1) / 3)


def test_margin_without_alternatives_uses_rest_of_mass() -> None:
    p = math.exp(-0.1)
    assert c.mean_margin([tok(-0.1)]) == pytest.approx(math.log(p) - math.log(1 - p))


def test_entropy_of_uniform_top2_is_log2() -> None:
    assert c.neg_mean_entropy([tok(-1.0, -1.0, -1.0)]) == pytest.approx(-math.log(2))
    assert c.neg_mean_entropy([tok(0.0, 0.0, -50.0)]) == pytest.approx(0.0, abs=1e-9)


def test_empty_answer_has_no_confidence() -> None:
    for name in c.AGGREGATORS:
        assert c.confidence(name, []) == float("-inf")


def test_unknown_aggregator_names_the_choices() -> None:
    with pytest.raises(KeyError, match="mean_logprob"):
        c.get_aggregator("nope")


def test_all_confidences_covers_every_aggregator() -> None:
    assert set(c.all_confidences(TOKS)) == set(c.AGGREGATORS)
