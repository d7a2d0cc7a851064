"""Choose a cascade threshold from an eval run, with a finite-sample guarantee.

Target quality (`--target-quality tau --delta d`): we want the cascade (keep the answer when
confidence >= t, else escalate) to reach tau times the frontier's quality, with probability at
least 1 - d over the calibration sample. Write q_c, q_f in [0, 1] for the cheap and frontier
scores of a query. Keeping a query costs l(t) = 1[conf >= t] * max(q_f - q_c, 0), so

    cascade(t) >= Q_f - E[l(t)]    and    cascade(t) >= tau * Q_f  <=  E[l(t)] <= (1 - tau) * Q_f.

The procedure (Learn-then-Test fixed-sequence testing, Angelopoulos et al. 2021):
1. Q_f: known (= 1) for an oracle frontier; else a one-sided lower bound at level d/2
   (Clopper-Pearson for 0/1 outcomes, Hoeffding for fractional scores), leaving d/2 for step 2.
2. Candidate thresholds are the observed confidences, tested from the most conservative
   (everything escalated, zero loss) downwards. At each, the upper confidence bound of E[l(t)]
   (Clopper-Pearson on the count of losses, or Hoeffding) must be <= (1 - tau) * lower(Q_f);
   the first failure stops the sequence and the last threshold that passed is chosen.
Because l(t) only shrinks as t rises, a chosen threshold that violates the target implies the
bound failed at one fixed (distribution-determined) threshold, an event of probability <= d/2;
with the Q_f bound, the target holds with probability >= 1 - d. The data-dependent candidate
grid is fine for the same monotonicity reason. Ignoring queries where the cheap answer beats the
frontier's makes the bound conservative, never optimistic.

Target escalation (`--target-escalation e`): the confidence quantile that escalates a share e of
the calibration queries, as RouteLLM calibrates its routers; no guarantee attached.

Either way a random held-out split (never used to choose) reports the realised quality and
escalation rate.
"""

from __future__ import annotations

import asyncio
import json
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
from localroute.errors import ConfigError, MissingExtraError
from localroute.evaluation.metrics import Array
from localroute.evaluation.runs import RunTable, from_eval_run, read_meta
from localroute.routing.confidence import AGGREGATORS, SIGNALS


def _beta() -> Any:
    try:
        from scipy.stats import beta
    except ImportError as exc:
        raise MissingExtraError("scipy", "eval") from exc  # a base dependency since issue 19; kept for broken installs
    return beta


def cp_upper(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial mean at level 1 - delta."""
    beta = _beta()
    return 1.0 if k >= n else float(beta.ppf(1 - delta, k + 1, n - k))


def cp_lower(k: int, n: int, delta: float) -> float:
    beta = _beta()
    return 0.0 if k <= 0 else float(beta.ppf(delta, k, n - k + 1))


def hoeffding_radius(n: int, delta: float) -> float:
    return math.sqrt(math.log(1 / delta) / (2 * n))


def _binary(*arrays: Array) -> bool:
    return all(bool(np.all((a == 0) | (a == 1))) for a in arrays)


@dataclass(slots=True)
class QualityThreshold:
    threshold: float
    bound: str
    loss_upper: float
    frontier_lower: float
    quality_lower: float
    n: int


def certify_quality(conf: Array, cheap: Array, frontier: Array, target: float, delta: float,
                    frontier_known: float | None = None) -> QualityThreshold:
    """The most permissive threshold whose cascade provably reaches `target` x frontier quality."""
    if not 0 < target <= 1 or not 0 < delta < 1:
        raise ConfigError("need 0 < target-quality <= 1 and 0 < delta < 1", param="target_quality")
    n = len(conf)
    if n == 0:
        raise ConfigError("no calibration rows", param="run")
    binary = _binary(cheap, frontier)
    bound = "clopper-pearson" if binary else "hoeffding"
    if frontier_known is not None:
        f_lower, d_loss = frontier_known, delta
    else:
        d_f, d_loss = delta / 2, delta / 2
        if binary:
            f_lower = cp_lower(int(frontier.sum()), n, d_f)
        else:
            f_lower = max(0.0, float(frontier.mean()) - hoeffding_radius(n, d_f))
    budget = (1 - target) * f_lower
    loss = np.maximum(frontier - cheap, 0.0)

    chosen, chosen_upper = ESCALATE_ALL, 0.0  # escalating everything loses nothing, surely
    finite = np.isfinite(conf)
    order = np.argsort(-conf[finite], kind="mergesort")
    sc, sl = conf[finite][order], loss[finite][order]
    if len(sc):
        # Candidate t = each distinct confidence, from the highest down; keep queries with conf >= t.
        last_of_group = np.nonzero(np.append(sc[1:] != sc[:-1], True))[0]
        totals = np.cumsum(sl)[last_of_group]
        if binary:
            beta = _beta()
            k = np.rint(totals).astype(np.int64)
            ucb = np.where(k >= n, 1.0, beta.ppf(1 - d_loss, k + 1, np.maximum(n - k, 1)))
        else:
            ucb = np.minimum(1.0, totals / n + hoeffding_radius(n, d_loss))
        fails = np.nonzero(ucb > budget)[0]
        passed = int(fails[0]) if len(fails) else len(ucb)  # fixed sequence: stop at the first failure
        if passed > 0:
            chosen, chosen_upper = float(sc[last_of_group[passed - 1]]), float(ucb[passed - 1])
    return QualityThreshold(chosen, bound, chosen_upper, f_lower, f_lower - chosen_upper, n)


def escalation_threshold(conf: Array, share: float) -> float:
    """The threshold escalating (at most) `share` of these queries: the least confident ones."""
    if not 0 <= share <= 1:
        raise ConfigError("--target-escalation must be in [0, 1]", param="target_escalation")
    s = np.sort(conf)
    k = round(share * len(s))
    if k >= len(s):
        return ESCALATE_ALL
    value = float(s[k])
    return value if math.isfinite(value) else float(np.min(s[np.isfinite(s)], initial=ESCALATE_ALL))


def realised(conf: Array, cheap: Array, frontier: Array, threshold: float) -> dict[str, float]:
    """Cascade quality and escalation rate of a threshold on some rows."""
    keep = conf >= threshold
    quality = float(np.where(keep, cheap, frontier).mean())
    fq = float(frontier.mean())
    return {
        "n": len(conf),
        "escalation_rate": round(float(1 - keep.mean()), 6),
        "cascade_quality": round(quality, 6),
        "cheap_quality": round(float(cheap.mean()), 6),
        "frontier_quality": round(fq, 6),
        "quality_ratio": round(quality / fq, 6) if fq > 0 else float("nan"),
    }


def _check_targets(target_quality: float | None, target_escalation: float | None, holdout: float) -> None:
    if (target_quality is None) == (target_escalation is None):
        raise ConfigError("give exactly one of --target-quality or --target-escalation", param="target_quality")
    if not 0 <= holdout < 1:
        raise ConfigError("--holdout must be in [0, 1)", param="holdout")


def fit_threshold(score: Array, cheap: Array, frontier: Array, *, holdout: float, seed: int, oracle: bool,
                  target_quality: float | None, target_escalation: float | None,
                  delta: float) -> tuple[float, Certificate, np.ndarray]:
    """Split the rows at random, fit the threshold on the calibration part (certified quality or an
    escalation quantile), check it on the held-out part. Returns the threshold, its certificate
    (held-out results included) and the calibration rows' indices."""
    perm = np.random.default_rng(seed).permutation(len(score))
    n_hold = round(holdout * len(score))
    hold, cal = perm[:n_hold], perm[n_hold:]
    if len(cal) == 0:
        raise ConfigError("--holdout leaves no calibration rows", param="holdout")
    if target_quality is not None:
        fit = certify_quality(score[cal], cheap[cal], frontier[cal], target_quality, delta,
                              frontier_known=1.0 if oracle else None)
        threshold = fit.threshold
        cert = Certificate(target="quality", target_value=target_quality, delta=delta, bound=fit.bound,
                           certified_loss_upper=round(fit.loss_upper, 6),
                           certified_quality_lower=round(fit.quality_lower, 6),
                           frontier_quality_lower=round(fit.frontier_lower, 6),
                           n_calibration=len(cal), n_holdout=len(hold))
    else:
        assert target_escalation is not None
        threshold = escalation_threshold(score[cal], target_escalation)
        cert = Certificate(target="escalation", target_value=target_escalation, n_calibration=len(cal),
                           n_holdout=len(hold))
    cert.holdout = realised(score[hold], cheap[hold], frontier[hold], threshold) if len(hold) else {}
    return threshold, cert, cal


def calibrate_run(
    run_dir: Path,
    out: Path,
    aggregator: str,
    target_quality: float | None = None,
    target_escalation: float | None = None,
    delta: float = 0.05,
    holdout: float = 0.5,
    seed: int = 0,
    per_category: bool = False,
    min_category_rows: int = 30,
    tier_fields: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Fit the threshold on a random calibration split of the run, check it on the rest, and write
    (or update) the calibration file. Returns the summary printed by the CLI. `per_category`: also
    one threshold per task category of the rows (`fit_categories`). `tier_fields`: per tier, its
    `confidence_fields`; field_confidence is rescored on the run's tier's, as serve computes it."""
    _check_targets(target_quality, target_escalation, holdout)
    if aggregator not in AGGREGATORS and aggregator not in SIGNALS:
        raise ConfigError(f"unknown aggregator {aggregator!r}; one of {sorted(AGGREGATORS) + list(SIGNALS)}",
                          param="aggregator")
    fields = (tier_fields or {}).get(str(read_meta(run_dir).get("tier")), ())
    table = RunTable(run_dir, fields)
    if table.n < 2:
        raise ConfigError(f"run {run_dir} has {table.n} usable rows; need at least 2", param="run")
    conf = table.conf[aggregator]
    fmode = table.meta["frontier"]["mode"]
    threshold, cert, cal = fit_threshold(conf, table.cheap, table.frontier, holdout=holdout, seed=seed,
                                         oracle=fmode == "oracle", target_quality=target_quality,
                                         target_escalation=target_escalation, delta=delta)
    cert_cal = realised(conf[cal], table.cheap[cal], table.frontier[cal], threshold)
    quantiles, histogram = confidence_distribution(conf[cal])
    fp = table.meta.get("fingerprint") or {}
    if not fp.get("template_sha256"):
        raise ConfigError(f"run {run_dir} has no model fingerprint (was it interrupted before loading?)", param="run")
    categories: dict[str, CategoryCalibration] = {}
    if per_category:
        row_categories = np.array(run_categories(table), dtype=object)
        categories = fit_categories(conf, table.cheap, table.frontier, row_categories, threshold, cert,
                                    holdout=holdout, seed=seed, oracle=fmode == "oracle",
                                    target_quality=target_quality, target_escalation=target_escalation,
                                    delta=delta, min_rows=min_category_rows)
    entry = TierCalibration(
        threshold=threshold, model_file=fp.get("model_file"), model_sha256=fp.get("model_sha256"),
        template_sha256=fp["template_sha256"], remote_model=fp.get("remote_model"), certificate=cert,
        confidence_quantiles=quantiles, confidence_histogram=histogram, n=len(cal), categories=categories,
    )
    tiers: dict[str, TierCalibration] = {}
    if out.is_file():
        try:
            old = load_calibration(out)
            if old.aggregator == aggregator and abs(old.alpha - table.alpha) < 1e-12:
                tiers.update(old.tiers)  # keep other tiers calibrated from other runs
        except ConfigError:
            pass
    tier = str(table.meta["tier"])
    tiers[tier] = entry
    cal_file = CalibrationFile(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        aggregator=aggregator, alpha=table.alpha, source_run=str(run_dir),
        dataset=table.meta.get("dataset"), frontier=dict(table.meta["frontier"]), tiers=tiers,
    )
    write_calibration(cal_file, out)
    return {
        "calibration_file": str(out),
        "tier": tier,
        "aggregator": aggregator,
        "threshold": threshold,
        "escalate_all": threshold >= ESCALATE_ALL,
        "upper_bound": fmode == "oracle",
        "certificate": cert.model_dump(),
        "calibration_split": cert_cal,
        "categories": {name: c.model_dump() for name, c in categories.items()},
    }


def run_categories(table: RunTable) -> list[str]:
    """Each usable row's task category: its dataset item's `meta.localroute_category` when the run's
    dataset file is readable and sets one, else the item id's prefix (`banking77-12` -> banking77,
    as `localroute data convert` names items)."""
    named: dict[str, str] = {}
    dataset = Path(str(table.meta.get("dataset") or ""))
    if dataset.is_file():
        for line in dataset.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
                category = (item.get("meta") or {}).get("localroute_category")
            except (ValueError, AttributeError):
                continue
            if isinstance(category, str):
                named[str(item.get("id"))] = category
    return [named.get(str(i)) or str(i).split("-", 1)[0] for i in table.ids]


def fit_categories(conf: Array, cheap: Array, frontier: Array, categories: np.ndarray, pooled_threshold: float,
                   pooled_cert: Certificate, *, holdout: float, seed: int, oracle: bool,
                   target_quality: float | None, target_escalation: float | None, delta: float,
                   min_rows: int) -> dict[str, CategoryCalibration]:
    """One threshold per category, each by `fit_threshold` on that category's rows alone, with
    delta split evenly over the K categories certified (delta / K each): by the union bound, every
    category's target holds at once with probability >= 1 - delta. A category with fewer than
    `min_rows` rows is not fitted: it keeps the pooled threshold and its certificate, flagged
    `fallback` (the pooled certificate is about the pooled traffic, not this category)."""
    names = sorted({str(c) for c in categories})
    fitted = [c for c in names if int(np.sum(categories == c)) >= min_rows]
    out: dict[str, CategoryCalibration] = {}
    share = delta / max(1, len(fitted))
    for name in names:
        rows = np.nonzero(categories == name)[0]
        if name not in fitted:
            out[name] = CategoryCalibration(
                threshold=pooled_threshold, certificate=pooled_cert, n=len(rows),
                fallback=f"pooled: {len(rows)} rows < {min_rows} needed to certify this category")
            continue
        threshold, cert, cal = fit_threshold(conf[rows], cheap[rows], frontier[rows], holdout=holdout, seed=seed,
                                             oracle=oracle, target_quality=target_quality,
                                             target_escalation=target_escalation, delta=share)
        out[name] = CategoryCalibration(threshold=threshold, certificate=cert, n=len(cal))
    return out


def calibrate_router(
    run_dir: Path,
    out: Path,
    settings: Any,
    target_quality: float | None = None,
    target_escalation: float | None = None,
    delta: float = 0.05,
    holdout: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """The pre-inference routers' threshold (`router_threshold`) from an eval run, by the same
    procedure as a cascade threshold with the router's P(cheap tier good) as the score.

    The routers are the ones the settings name (router_embedding_path, router_classifier_path), as
    `serve` loads them; each query of the run gets the score of the first router for which it is not
    novel (embedding first, as /hybrid asks). Queries novel to every router go to the cascade: for
    the certificate they count as escalated, which never flatters it. The uncertainty margin of
    /hybrid only sends more queries to the cascade and is not modelled. The threshold is written to
    the calibration file's `router` entry with the artefacts' file hashes; `serve` uses it only
    while those files are unchanged.
    """
    from localroute.calibration_file import RouterCalibration, file_sha256
    from localroute.routing.prerouter import load_models, router_scores

    _check_targets(target_quality, target_escalation, holdout)
    models, encoders = load_models(settings)
    if not models:
        raise ConfigError("no pre-inference router to calibrate: set router_embedding_path and/or "
                          "router_classifier_path (train them with `localroute train`)", param="router")
    ordered = [models[k] for k in ("embedding", "classifier") if k in models]
    data = from_eval_run(run_dir)
    keep_rows = ~np.isnan(data.labels).any(axis=1)
    texts = [t for t, k in zip(data.texts, keep_rows, strict=True) if k]
    cheap, frontier = data.labels[keep_rows, 0].astype(np.float64), data.labels[keep_rows, 1].astype(np.float64)
    if len(texts) < 2:
        raise ConfigError(f"run {run_dir} has {len(texts)} rows with query text and both outcomes; need at least 2",
                          param="run")
    needed = {m.encoder_name for m in ordered}
    encoded = {name: encoders[name].encode(texts) for name in needed}
    vectors = [{name: encoded[name][i] for name in needed} for i in range(len(texts))]
    score = router_scores(ordered, vectors)
    meta = read_meta(run_dir)
    fmode = (meta.get("frontier") or {}).get("mode")
    threshold, cert, cal = fit_threshold(score, cheap, frontier, holdout=holdout, seed=seed,
                                         oracle=fmode == "oracle", target_quality=target_quality,
                                         target_escalation=target_escalation, delta=delta)
    quantiles, _ = confidence_distribution(score[cal])
    entry = RouterCalibration(
        threshold=threshold, certificate=cert, score_quantiles=quantiles, n=len(cal),
        artifacts={kind: file_sha256(m.artifact.path) for kind, m in models.items() if m.artifact.path},
        n_novel=int(np.sum(~np.isfinite(score[cal]))),
    )
    cal_file = load_calibration(out) if out.is_file() else CalibrationFile(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"), aggregator=settings.confidence_aggregator,
        alpha=settings.confidence_quantile_alpha, source_run=str(run_dir), dataset=meta.get("dataset"),
        frontier=dict(meta.get("frontier") or {}), tiers={})
    cal_file.router = entry
    write_calibration(cal_file, out)
    return {
        "calibration_file": str(out),
        "routers": sorted(models),
        "threshold": threshold,
        "escalate_all": threshold >= ESCALATE_ALL,
        "upper_bound": fmode == "oracle",
        "n_novel": entry.n_novel,
        "certificate": cert.model_dump(),
        "calibration_split": realised(score[cal], cheap[cal], frontier[cal], threshold),
    }


# ---------- recalibration from production (issue 19) ----------


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
    beta = _beta()
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
