"""Recalibration from production (`localroute calibrate --from-log`, issue 19): per (tier,
category) thresholds refitted from the routing log's shadow pairs (and feedback on them), with the
guarantee of the offline fit (thresholds.py): a stratified Clopper-Pearson bound on the loss over
the category's traffic, tested in fixed sequence from the most conservative threshold down.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from localroute.calibration_file import (
    ESCALATE_ALL,
    CalibrationFile,
    CategoryCalibration,
    Certificate,
    TierCalibration,
    confidence_distribution,
    load_calibration,
    write_calibration,
)
from localroute.errors import ConfigError
from localroute.evaluation.metrics import Array
from localroute.evaluation.thresholds import QualityThreshold, beta_distribution

__all__ = ["LogSample", "calibrate_from_log", "certify_from_log", "fitted_row", "log_samples"]


@dataclass(slots=True)
class LogSample:
    """One (tier, category)'s evidence from the routing log for `certify_from_log`: the scored
    shadow pairs (confidence, label, draw probability, stratum) and the traffic they were drawn from."""

    confidence: Array
    label: Array  # 1: the local answer agreed with the frontier (or passed human feedback)
    sample_rate: Array
    stratum: list[str]
    n_population: int  # requests of the category that reached the tier
    n_accepted: dict[str, int]  # of those, accepted by the tier, per stratum
    floor: float  # the highest threshold the tier had over the pairs' window (their own stored thresholds)


def certify_from_log(sample: LogSample, target: float, delta: float) -> QualityThreshold:
    """The most permissive threshold >= `sample.floor` whose agreement with the frontier over the
    category's traffic provably reaches `target`, at level 1 - delta.

    A request's loss at threshold t: kept (conf >= t) and wrong. For t >= floor only accepted
    requests can be kept, so with strata s (one when sampling is uniform), pi_s the share of the
    traffic the tier accepted in stratum s (counted over the whole log window) and L_s(t) the loss
    rate among them, E[loss(t)] = sum_s pi_s L_s(t). The scored pairs of stratum s are a uniform
    random sample of its accepted answers (Bernoulli draws; draws that failed or were dropped are
    taken as missing at random), so a one-sided Clopper-Pearson bound at delta / S bounds each
    L_s(t), and sum_s pi_s ucb_s(t) bounds E[loss(t)] with probability >= 1 - delta. Thresholds are
    tested as offline (fixed sequence from the most conservative down, `certify_quality`): the
    losses only shrink as t rises, so the chosen one misses the target with probability <= delta.
    This is the reweighting of stratified draws: each stratum counts at its share of the traffic,
    not at its share of the pairs. (pi_s is the window's realised mix, taken as the traffic's.)"""
    n_pop = sample.n_population
    if n_pop == 0 or len(sample.confidence) == 0:
        return QualityThreshold(ESCALATE_ALL, "none", 0.0, 1.0, 1.0, 0)
    strata = sorted(set(sample.stratum) | set(sample.n_accepted))
    d_s = delta / len(strata)
    stratum = np.array(sample.stratum, dtype=object)
    keep_conf = sample.confidence >= sample.floor  # below the floor: escalated at some point, never kept at t >= floor
    candidates = np.unique(sample.confidence[keep_conf])[::-1]  # highest first
    if len(candidates) == 0:
        return QualityThreshold(ESCALATE_ALL, "clopper-pearson (stratified)", 0.0, 1.0, 1.0, n_pop)
    beta = beta_distribution()
    ucb = np.zeros(len(candidates))
    for s in strata:
        rows = stratum == s
        n_s = int(rows.sum())
        share = sample.n_accepted.get(s, 0) / n_pop
        if share == 0:
            continue
        if n_s == 0:
            ucb += share
            continue
        wrong = np.sort(sample.confidence[rows & keep_conf & (sample.label < 0.5)])
        k = len(wrong) - np.searchsorted(wrong, candidates, side="left")  # wrong pairs with conf >= t
        ucb += share * np.where(k >= n_s, 1.0, beta.ppf(1 - d_s, k + 1, np.maximum(n_s - k, 1)))
    ucb = np.minimum(ucb, 1.0)
    fails = np.nonzero(ucb > 1 - target)[0]
    passed = int(fails[0]) if len(fails) else len(ucb)
    if passed == 0:
        return QualityThreshold(ESCALATE_ALL, "clopper-pearson (stratified)", 0.0, 1.0, 1.0, n_pop)
    return QualityThreshold(float(candidates[passed - 1]), "clopper-pearson (stratified)", float(ucb[passed - 1]),
                            1.0, 1.0 - float(ucb[passed - 1]), n_pop)


def fitted_row(row: dict[str, Any], aggregator: str | None) -> bool:
    """Whether a requests row is evidence for a threshold on `aggregator`: a cascade-like policy (the
    cascade, or a pre-router that left the query to it: signal `embedding>mean_logprob`) deciding on
    that signal. A verifier's P(yes) or another aggregator's values are on another scale. None: any."""
    if aggregator is None:
        return True
    policy, signal = str(row.get("policy") or ""), str(row.get("signal") or "")
    return policy.startswith("localroute/") and policy != "localroute/verified" \
        and signal.rsplit(">", 1)[-1] == aggregator


def log_samples(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], margin: float,
                default_category: str = "default", aggregator: str | None = None) -> dict[tuple[str, str], LogSample]:
    """(tier, category) -> LogSample from the routing log's requests and shadow pairs; with
    `aggregator`, only the requests (and their pairs) that `fitted_row` keeps."""
    from localroute.monitoring.log_report import row_category

    if aggregator is not None:
        rows = [r for r in rows if fitted_row(r, aggregator)]
        kept = {r.get("request_id") for r in rows}
        pairs = [p for p in pairs if p.get("request_id") in kept]
    pop: dict[tuple[str, str], dict[str, Any]] = {}
    stratified = any(p.get("stratum") in ("near", "far") for p in pairs)
    for r in rows:
        if r.get("status") != 200:
            continue
        cat = row_category(r, default_category)
        for a in r.get("attempts") or []:
            if a.get("threshold") is None or a.get("error"):
                continue
            e = pop.setdefault((a["tier"], cat), {"n": 0, "acc": {}})
            e["n"] += 1
            if a.get("accepted") and r.get("tier") == a["tier"] and not r.get("degraded"):
                conf = a.get("confidence")
                near = stratified and conf is not None and conf - a["threshold"] < margin
                s = ("near" if near else "far") if stratified else "all"
                e["acc"][s] = e["acc"].get(s, 0) + 1
    out: dict[tuple[str, str], LogSample] = {}
    for key, e in pop.items():
        ps = [p for p in pairs if (p["tier"], p["category"]) == key and p["status"] == "scored"
              and p.get("label") is not None and p.get("confidence") is not None]
        # the floor: the highest threshold the pairs themselves were accepted at (each pair stores its
        # own), not the highest ever logged: an old conservative threshold outside the pairs' window
        # (read with `since`) would otherwise pin every later refit at or above it
        floor = max((float(p["threshold"]) for p in ps if p.get("threshold") is not None), default=-math.inf)
        out[key] = LogSample(np.array([p["confidence"] for p in ps], dtype=np.float64),
                             np.array([float(p["label"]) for p in ps], dtype=np.float64),
                             np.array([p["sample_rate"] for p in ps], dtype=np.float64),
                             [str(p.get("stratum") or "all") for p in ps], e["n"], e["acc"], floor)
    return out


def calibrate_from_log(log_path: Path | str, out: Path, settings: Any, target_quality: float, delta: float = 0.05,
                       min_category_rows: int = 30, since: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Refit the per-category thresholds of every local tier from the routing log's shadow pairs
    (and feedback on them), with the same guarantee as offline (`certify_from_log`), delta split
    evenly over the (tier, category) pairs certified; write them into the calibration file (the
    pooled thresholds and fingerprints are kept; with no file yet, the tiers are fingerprinted by
    loading them and the pooled threshold is fitted on all of the log's pairs)."""
    from localroute.monitoring.log_report import read_rows, read_shadow_pairs, shown_log

    if not 0 < target_quality <= 1 or not 0 < delta < 1:
        raise ConfigError("need 0 < target-quality <= 1 and 0 < delta < 1", param="target_quality")
    from localroute.monitoring.postgres_log import is_postgres_url

    if not is_postgres_url(log_path) and not Path(log_path).is_file():
        raise ConfigError(f"routing log not found: {log_path}", param="routing_log_path")
    shown = shown_log(log_path)
    rows, pairs = read_rows(log_path, since), read_shadow_pairs(log_path, since)
    aggregator, alpha = settings.confidence_aggregator, settings.confidence_quantile_alpha
    cal_file = load_calibration(out) if out.is_file() else None
    if cal_file is not None and (cal_file.aggregator != aggregator or abs(cal_file.alpha - alpha) > 1e-12):
        raise ConfigError(f"calibration file {out} is for {cal_file.aggregator} (alpha {cal_file.alpha}), the "
                          f"settings use {aggregator} (alpha {alpha}): refit it offline (`localroute calibrate`) or "
                          "set confidence_aggregator / confidence_quantile_alpha to match", param="confidence_aggregator")
    samples = log_samples(rows, pairs, settings.shadow_near_threshold_margin, settings.default_category, aggregator)
    if not samples:
        raise ConfigError(f"routing log {shown} has no cascade requests on {aggregator} to recalibrate from",
                          param="log")
    if cal_file is None:
        cal_file = _new_calibration(settings, samples)
    certify = [k for k, s in samples.items() if len(s.confidence) >= min_category_rows and k[0] in cal_file.tiers]
    share = delta / max(1, len(certify))
    result: dict[str, Any] = {}
    for (tier, cat), sample in sorted(samples.items()):
        entry = cal_file.tiers.get(tier)
        if entry is None:
            continue
        n_pairs = len(sample.confidence)
        why: str | None = None
        if (tier, cat) not in certify:
            why = f"too few shadow pairs ({n_pairs}) to refit"
            fallback = f"pooled: {n_pairs} shadow pairs < {min_category_rows} needed to certify"
        else:
            fit = certify_from_log(sample, target_quality, share)
            if fit.threshold >= ESCALATE_ALL:
                # no threshold at or above the floor reaches the target: that is no certificate to
                # escalate everything (applied, it would stop the very shadow pairs that could lift it)
                why = f"no threshold certifiable at quality {target_quality} from {n_pairs} shadow pairs"
                fallback = f"pooled: {why}"
            else:
                cert = Certificate(target="quality", target_value=target_quality, delta=share, bound=fit.bound,
                                   certified_loss_upper=round(fit.loss_upper, 6),
                                   certified_quality_lower=round(fit.quality_lower, 6), frontier_quality_lower=1.0,
                                   n_calibration=n_pairs, n_holdout=0,
                                   n_population=sample.n_population, floor=sample.floor)
                entry.categories[cat] = CategoryCalibration(threshold=fit.threshold, certificate=cert, n=n_pairs,
                                                            source="log")
        if why is not None:
            old = entry.categories.get(cat)
            if old is not None and old.fallback is None and old.threshold < ESCALATE_ALL:
                # certified before (an eval run, an earlier refit): kept
                result.setdefault(tier, {})[cat] = {"threshold": old.threshold, "pairs": n_pairs,
                                                    "population": sample.n_population, "fallback": None,
                                                    "kept": f"{why}; the earlier certified threshold stays",
                                                    "escalate_all": False,
                                                    "certificate": old.certificate.model_dump()}
                continue
            entry.categories[cat] = CategoryCalibration(
                threshold=entry.threshold, certificate=entry.certificate, n=n_pairs, source="log", fallback=fallback)
        c = entry.categories[cat]
        result.setdefault(tier, {})[cat] = {"threshold": c.threshold, "escalate_all": c.threshold >= ESCALATE_ALL,
                                            "pairs": n_pairs, "population": sample.n_population,
                                            "fallback": c.fallback, "certificate": c.certificate.model_dump()}
    cal_file.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    write_calibration(cal_file, out)
    return {"calibration_file": str(out), "log": shown, "target_quality": target_quality, "delta": delta,
            "certified": sum(1 for t in result.values() for c in t.values() if c["fallback"] is None
                                 and "kept" not in c), "tiers": result}


def _new_calibration(settings: Any, samples: dict[tuple[str, str], LogSample]) -> CalibrationFile:
    """A calibration file for a ladder never calibrated offline: each local tier fingerprinted by
    loading it, its pooled threshold certified on all of the log's pairs at the whole delta."""
    from localroute.backends.base import load_backend
    from localroute.calibration_file import backend_fingerprint

    tiers: dict[str, TierCalibration] = {}
    for ts in settings.ladder()[:-1]:
        backend = load_backend(ts, settings)
        try:
            fp = backend_fingerprint(backend)
        finally:
            asyncio.run(backend.aclose())
        mine = [s for (t, _), s in samples.items() if t == ts.name]
        confs = np.concatenate([s.confidence for s in mine]) if mine else np.array([])
        quantiles, histogram = confidence_distribution(confs)
        tiers[ts.name] = TierCalibration(
            threshold=settings.default_threshold, model_file=fp.get("model_file"), model_sha256=fp.get("model_sha256"),
            template_sha256=fp["template_sha256"], remote_model=fp.get("remote_model"),
            certificate=Certificate(target="escalation", target_value=0.0, n_calibration=0, n_holdout=0,
                                    note="no offline calibration: the pooled threshold is default_threshold"),
            confidence_quantiles=quantiles, confidence_histogram=histogram, n=len(confs))
    return CalibrationFile(created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                           aggregator=settings.confidence_aggregator, alpha=settings.confidence_quantile_alpha,
                           source_run="routing log", tiers=tiers)
