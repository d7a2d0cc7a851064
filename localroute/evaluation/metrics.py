"""Routing metrics over one table of (confidence, cheap score, frontier score) rows.

Deferral curve: escalate the k least confident queries (k = 0..n) and measure the mean quality
when escalated queries get the frontier's score and the rest keep the cheap one. Confidence ties
cannot be split by a threshold, so inside a tie group the curve is the expectation under random
order (linear interpolation between the group's ends). Random routing is the straight line between
the two endpoints; oracle routing escalates the queries with the largest frontier-minus-cheap gain
first. x is the share escalated in [0, 1].

RouteLLM (arXiv 2406.18665) terms: PGR(x) = (quality(x) - cheap) / (frontier - cheap); APGR is the
area under PGR over x in [0, 1] (random routing scores 0.5); CPT(p) is the smallest share of
escalations with PGR >= p. They are undefined (None) when the frontier is no better than the cheap
tier, since there is no gap to recover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

# Aggregators whose values are log-probabilities (exp gives a probability-like number).
PROBABILITY_MAP: dict[str, str] = {"mean_margin": "sigmoid"}


def as_probability(conf: Array, aggregator: str) -> Array:
    """The aggregator's natural probability reading, for ECE: exp(value) for the logprob and
    entropy aggregators (the geometric-mean token probability, exp(-entropy)); sigmoid(margin) for
    mean_margin (p1 / (p1 + p2))."""
    conf = np.asarray(conf, dtype=np.float64)
    if aggregator == "verifier":  # already P(Yes)
        return np.clip(conf, 0.0, 1.0)
    if PROBABILITY_MAP.get(aggregator) == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.clip(conf, -700, 700)))
    return np.exp(np.minimum(conf, 0.0))


def auroc(conf: Array, correct: NDArray[np.bool_]) -> float | None:
    """P(a random correct answer has higher confidence than a random wrong one); ties count half."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(conf, kind="mergesort")
    ranks = np.empty(len(conf), dtype=np.float64)
    sorted_conf = conf[order]
    i = 0
    while i < len(conf):  # average ranks over ties
        j = i
        while j + 1 < len(conf) and sorted_conf[j + 1] == sorted_conf[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[correct].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def ece(prob: Array, correct: NDArray[np.bool_], bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of [0, 1]."""
    prob = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() * abs(prob[mask].mean() - correct[mask].mean())
    return float(total / len(prob)) if len(prob) else 0.0


def deferral_curve(conf: Array, cheap: Array, frontier: Array) -> Array:
    """Quality after escalating the k least confident queries, k = 0..n (length n + 1)."""
    conf = np.asarray(conf, dtype=np.float64)
    gain = np.asarray(frontier, dtype=np.float64) - np.asarray(cheap, dtype=np.float64)
    n = len(conf)
    base = float(np.sum(cheap))
    order = np.argsort(conf, kind="mergesort")
    sorted_conf, sorted_gain = conf[order], gain[order]
    curve = np.empty(n + 1, dtype=np.float64)
    curve[0] = base
    done, acc = 0, base
    while done < n:
        end = done
        while end + 1 < n and sorted_conf[end + 1] == sorted_conf[done]:
            end += 1
        group = sorted_gain[done : end + 1]
        size = len(group)
        mean_gain = float(group.mean())
        for j in range(1, size + 1):  # expected gain of escalating j of the tied queries
            curve[done + j] = acc + j * mean_gain
        acc += float(group.sum())
        done = end + 1
    return curve / n


def oracle_curve(cheap: Array, frontier: Array) -> Array:
    gain = np.sort(np.asarray(frontier, dtype=np.float64) - np.asarray(cheap, dtype=np.float64))[::-1]
    n = len(gain)
    return np.concatenate([[0.0], np.cumsum(gain)]) / n + float(np.mean(cheap))


def random_curve(cheap: Array, frontier: Array) -> Array:
    n = len(cheap)
    x = np.arange(n + 1) / n
    return float(np.mean(cheap)) + x * (float(np.mean(frontier)) - float(np.mean(cheap)))


def _trapezoid(y: Array) -> float:
    """Area under y sampled at x = 0, 1/n, ..., 1."""
    n = len(y) - 1
    return float((y[:-1] + y[1:]).sum() / (2 * n)) if n > 0 else float(y[0])


def pgr(curve: Array, cheap_quality: float, frontier_quality: float) -> Array | None:
    gap = frontier_quality - cheap_quality
    if gap <= 1e-12:
        return None
    return (curve - cheap_quality) / gap


def cpt(pgr_curve: Array | None, target: float) -> float | None:
    """Smallest share escalated whose PGR reaches `target` (0..1)."""
    if pgr_curve is None:
        return None
    n = len(pgr_curve) - 1
    hits = np.nonzero(pgr_curve >= target - 1e-12)[0]
    return float(hits[0] / n) if len(hits) else None


@dataclass(slots=True)
class RoutingMetrics:
    auroc: float | None
    ece: float
    auc: float
    apgr: float | None
    cpt50: float | None
    cpt80: float | None
    cpt95: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 6))
                for k, v in ((s, getattr(self, s)) for s in self.__slots__)}


def curve_metrics(curve: Array, cheap_quality: float, frontier_quality: float) -> dict[str, float | None]:
    """AUC, APGR and CPT(50/80/95) of any deferral curve (router, random or oracle)."""
    p = pgr(curve, cheap_quality, frontier_quality)
    return {
        "auc": _trapezoid(curve),
        "apgr": _trapezoid(p) if p is not None else None,
        "cpt50": cpt(p, 0.5),
        "cpt80": cpt(p, 0.8),
        "cpt95": cpt(p, 0.95),
    }


def routing_metrics(conf: Array, cheap: Array, frontier: Array, correct: NDArray[np.bool_],
                    aggregator: str) -> tuple[RoutingMetrics, Array]:
    """Every metric of one aggregator, and its deferral curve."""
    curve = deferral_curve(conf, cheap, frontier)
    m = curve_metrics(curve, float(np.mean(cheap)), float(np.mean(frontier)))
    return RoutingMetrics(
        auroc=auroc(conf, correct),
        ece=ece(as_probability(conf, aggregator), correct),
        auc=float(m["auc"] or 0.0),
        apgr=m["apgr"],
        cpt50=m["cpt50"],
        cpt80=m["cpt80"],
        cpt95=m["cpt95"],
    ), curve


def bootstrap_intervals(conf: Array, cheap: Array, frontier: Array, correct: NDArray[np.bool_], n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals of AUROC, APGR and CPT(95%): rows resampled with replacement
    `n_boot` times (seeded), each metric recomputed; a metric undefined in more than half of the
    resamples (no wrong answers, no gap to recover) has no interval (None)."""
    conf = np.asarray(conf, dtype=np.float64)
    cheap = np.asarray(cheap, dtype=np.float64)
    frontier = np.asarray(frontier, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(conf)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"auroc": [], "apgr": [], "cpt95": []}
    for _ in range(n_boot if n else 0):
        idx = rng.integers(0, n, n)
        a = auroc(conf[idx], correct[idx])
        if a is not None:
            samples["auroc"].append(a)
        m = curve_metrics(deferral_curve(conf[idx], cheap[idx], frontier[idx]),
                          float(np.mean(cheap[idx])), float(np.mean(frontier[idx])))
        if m["apgr"] is not None:
            samples["apgr"].append(float(m["apgr"]))
        if m["cpt95"] is not None:
            samples["cpt95"].append(float(m["cpt95"]))
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return {k: (float(np.quantile(v, lo)), float(np.quantile(v, hi))) if len(v) * 2 > n_boot else None
            for k, v in samples.items()}


def paired_auroc_delta(conf: Array, base: Array, correct: NDArray[np.bool_], n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, tuple[float, float]] | None:
    """AUROC(conf) - AUROC(base) on the same rows, with its paired percentile-bootstrap interval:
    both signals rescored on each resample, so what they share (which rows are hard) cancels, and
    the interval is of the difference itself: two separate intervals that overlap can still hide a
    real difference, which this one shows. With the same `seed` and row count it draws the same
    resamples as `bootstrap_intervals`. None where AUROC is undefined (no wrong or no right
    answer), or in more than half of the resamples."""
    conf = np.asarray(conf, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    a, b = auroc(conf, correct), auroc(base, correct)
    if a is None or b is None:
        return None
    n = len(conf)
    rng = np.random.default_rng(seed)
    deltas: list[float] = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        x, y = auroc(conf[idx], correct[idx]), auroc(base[idx], correct[idx])
        if x is not None and y is not None:
            deltas.append(x - y)
    if len(deltas) * 2 <= n_boot:
        return None
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return a - b, (float(np.quantile(deltas, lo)), float(np.quantile(deltas, hi)))
