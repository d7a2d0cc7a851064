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

Refitting from production traffic (`calibrate --from-log`: the routing log's shadow pairs) is
from_log.py's, with the same fixed-sequence test.
"""

from __future__ import annotations

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


def beta_distribution() -> Any:
    """scipy's beta distribution (the Clopper-Pearson bounds' quantiles)."""
    try:
        from scipy.stats import beta
    except ImportError as exc:
        raise MissingExtraError("scipy", "eval") from exc  # a base dependency since issue 19; kept for broken installs
    return beta


def cp_upper(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial mean at level 1 - delta."""
    beta = beta_distribution()
    return 1.0 if k >= n else float(beta.ppf(1 - delta, k + 1, n - k))


def cp_lower(k: int, n: int, delta: float) -> float:
    beta = beta_distribution()
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
            beta = beta_distribution()
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
