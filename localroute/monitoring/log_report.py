"""Reading the routing log: rows by time, the summaries `localroute report` prints (escalation
rate and its health band, confidence against the calibrated distribution, cost per query, by
period and tier), the review sample with its feedback, and the requests with feedback as labelled
queries for `localroute train --from-log`. The log's writer is routing_log.py; the calibration file
is read through `calibration_file.load_calibration`, the strict loader `serve` uses."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from localroute.calibration_file import CalibrationFile, load_calibration, quality_targets
from localroute.errors import ConfigError
from localroute.monitoring.routing_log import COLUMNS
from localroute.routing.training import LabelledQueries

__all__ = ["category_summary", "escalation_health", "from_routing_log", "live_quality", "live_quality_series",
           "read_calibration", "read_rows", "read_shadow_pairs", "report", "review_summary", "row_category",
           "shown_log", "summarize"]


def read_rows(path: Path | str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """Rows in [since, until) (unix seconds) as dicts, oldest first; missing columns of an older
    schema read as None. `path`: a SQLite file or a postgresql:// URL. Opening does not migrate:
    reporting never writes to the log."""
    from localroute.monitoring.routing_log import open_store

    store = open_store(path, read_only=True)
    try:
        rows = store.read_requests(since, until)
    finally:
        store.close()
    for r in rows:
        for c in COLUMNS:
            r.setdefault(c, None)
        try:
            r["attempts"] = json.loads(r["attempts"] or "[]")
        except ValueError:
            r["attempts"] = []
        try:
            r["evidence"] = json.loads(r["evidence"]) if r["evidence"] else None
        except ValueError:
            r["evidence"] = None
    return rows


HEALTH_BAND = (0.15, 0.35)


def escalation_health(rate: float | None) -> str:
    """The usual band of a calibrated cascade is 15-35% escalations."""
    if rate is None:
        return "no_data"
    if rate > 0.50:
        return "too_conservative"
    if rate < 0.05:
        return "too_permissive"
    if HEALTH_BAND[0] <= rate <= HEALTH_BAND[1]:
        return "healthy"
    return "outside_band"


HEALTH_NOTES = {
    "too_conservative": "over 50% of answered queries escalate: the threshold is probably too strict",
    "too_permissive": "under 5% escalate: the threshold is probably too lenient (quality risk)",
    "outside_band": "outside the usual 15-35% band of a calibrated cascade",
    "healthy": "within the usual 15-35% band of a calibrated cascade",
    "no_data": "no answered requests in the window",
}


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _pct(values: Sequence[float], qs: Iterable[float]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return {f"p{round(q * 100)}": (float(np.quantile(arr, q)) if arr.size else None) for q in qs}


def read_calibration(path: Path | None) -> CalibrationFile | None:
    """The calibration file to compare confidences with, read by the loader `serve` uses: a file
    that cannot be read or is not valid is a ConfigError saying why; no path, no comparison."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"calibration file not found: {path}", param="calibration_path")
    return load_calibration(Path(path))


def _nearest(quantiles: dict[float, float], q: float) -> float | None:
    if not quantiles:
        return None
    return quantiles[min(quantiles, key=lambda k: abs(k - q))]


def _bucket_start(ts: float, bucket: str) -> float:
    size = 3600 if bucket == "hour" else 86400
    return math.floor(ts / size) * size


def summarize(rows: Sequence[dict[str, Any]], bucket: str = "day",
              calibration: CalibrationFile | None = None) -> dict[str, Any]:
    """Everything `localroute report` shows, as JSON-able data."""
    answered = [r for r in rows if r["status"] == 200 and r["tier"]]
    n_ans = len(answered)
    escalated = sum(1 for r in answered if r["escalated"])
    rate = escalated / n_ans if n_ans else None
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    total_cost = float(sum(costs))
    with_cf = [r for r in rows if r["counterfactual_cost_usd"] is not None and r["cost_usd"] is not None]
    cf_total = float(sum(r["counterfactual_cost_usd"] for r in with_cf))
    cost_with_cf = float(sum(r["cost_usd"] for r in with_cf))
    savings = 100.0 * (cf_total - cost_with_cf) / cf_total if cf_total > 0 else None

    by_tier: dict[str, int] = {}
    for r in answered:
        by_tier[r["tier"]] = by_tier.get(r["tier"], 0) + 1
    conf: dict[str, list[float]] = {}
    tokens: dict[str, dict[str, int]] = {}
    for r in rows:
        for a in r["attempts"]:
            tier = a.get("tier")
            if not tier:
                continue
            t = tokens.setdefault(tier, {"prompt": 0, "completion": 0})
            t["prompt"] += int(a.get("prompt_tokens") or 0)
            t["completion"] += int(a.get("completion_tokens") or 0)
            if a.get("confidence") is not None:
                conf.setdefault(tier, []).append(float(a["confidence"]))
    confidence = {}
    for tier, values in conf.items():
        cal = calibration.tiers.get(tier) if calibration is not None else None
        entry: dict[str, Any] = {"n": len(values), "mean": float(np.mean(values)), **_pct(values, QUANTILES)}
        cq = cal.quantiles() if cal is not None else {}
        if cq:
            median, p10 = _nearest(cq, 0.5), _nearest(cq, 0.1)
            entry["calibration"] = {f"p{round(q * 100)}": v for q, v in cq.items()}
            entry["median_shift"] = entry["p50"] - median if median is not None else None
            if p10 is not None:
                # a calibrated tier puts ~10% of its confidences below its own p10; far off means drift
                entry["share_below_calibration_p10"] = float(np.mean(np.asarray(values) < p10))
        confidence[tier] = entry

    buckets: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        buckets.setdefault(_bucket_start(r["ts"], bucket), []).append(r)
    series = []
    for start in sorted(buckets):
        b = buckets[start]
        b_ans = [r for r in b if r["status"] == 200 and r["tier"]]
        b_cost = [r["cost_usd"] for r in b if r["cost_usd"] is not None]
        b_cf = [r["counterfactual_cost_usd"] for r in b if r["counterfactual_cost_usd"] is not None]
        series.append({
            "start": start,
            "requests": len(b),
            "escalation_rate": (sum(1 for r in b_ans if r["escalated"]) / len(b_ans)) if b_ans else None,
            "cost_per_query_usd": (sum(b_cost) / len(b_cost)) if b_cost else None,
            "counterfactual_per_query_usd": (sum(b_cf) / len(b_cf)) if b_cf else None,
        })

    latency = [r["latency_s"] for r in rows if r["status"] == 200 and r["latency_s"] is not None]
    ttft = [r["ttft_s"] for r in rows if r["status"] == 200 and r["ttft_s"] is not None]
    utils = [r["gpu_utilization_ratio"] for r in rows if r["gpu_utilization_ratio"] is not None]
    energy = [r["energy_j"] for r in rows if r["energy_j"] is not None]
    health = escalation_health(rate)
    return {
        "since": rows[0]["ts"] if rows else None,
        "until": rows[-1]["ts"] if rows else None,
        "requests": len(rows),
        "answered": n_ans,
        "errors": sum(1 for r in rows if r["status"] != 200),
        "streamed": sum(1 for r in rows if r["stream"]),
        "escalated": escalated,
        "escalation_rate": rate,
        "escalation_health": health,
        "escalation_note": HEALTH_NOTES[health],
        "answered_by_tier": by_tier,
        "tokens_by_tier": tokens,
        "cost_usd": total_cost,
        "cost_per_query_usd": total_cost / len(costs) if costs else None,
        "counterfactual_cost_usd": cf_total if with_cf else None,
        "savings_pct": savings,
        "latency_s": _pct(latency, (0.5, 0.9, 0.95, 0.99)),
        "ttft_s": _pct(ttft, (0.5, 0.9, 0.95, 0.99)),
        "confidence": confidence,
        "gpu_utilization_mean": float(np.mean(utils)) if utils else None,
        "energy_j": float(sum(energy)) if energy else None,
        "bucket": bucket,
        "series": series,
    }


def report(path: Path | str, since: float | None = None, until: float | None = None, bucket: str = "day",
           calibration_path: Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`localroute report`'s one library call: the summary and the rows it came from."""
    calibration = read_calibration(calibration_path)  # a broken file fails before any work
    rows = read_rows(path, since, until)
    summary = summarize(rows, bucket, calibration)
    summary["log"] = shown_log(path)
    summary["window"] = {"since": since, "until": until}
    summary["review"] = review_summary(path)
    summary["categories"] = category_summary(rows)
    targets = quality_targets(calibration) if calibration is not None else {}
    pairs = read_shadow_pairs(path, since, until)
    summary["live_quality"] = live_quality(rows, pairs, targets)
    summary["live_quality"]["series"] = live_quality_series(pairs, bucket)
    return summary, rows


def category_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Answered requests and escalation rate per task category."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("status") != 200:
            continue
        c = out.setdefault(row_category(r), {"answered": 0, "escalated": 0})
        c["answered"] += 1
        c["escalated"] += int(bool(r.get("escalated")))
    for c in out.values():
        c["escalation_rate"] = round(c["escalated"] / c["answered"], 6) if c["answered"] else None
    return dict(sorted(out.items()))


def review_summary(path: Path | str, limit: int = 20) -> dict[str, Any]:
    """The human-review sample (review_sample_rate): how many were marked, which still await feedback."""
    from localroute.monitoring.feedback import FeedbackStore

    try:
        store = FeedbackStore(path)
        marked = store.review_queue(pending_only=False, limit=1_000_000)
        pending = [r for r in marked if not r["feedback"]]
    except sqlite3.Error:  # a log older than the review migration: nothing sampled
        return {"sampled": 0, "reviewed": 0, "pending": 0, "pending_request_ids": []}
    return {"sampled": len(marked), "reviewed": len(marked) - len(pending), "pending": len(pending),
            "pending_request_ids": [r["request_id"] for r in pending[:limit]]}



def from_routing_log(db: Path | str, tiers: list[str]) -> LabelledQueries:
    """Requests with stored prompt text and at least one feedback row, for `localroute train`: the
    answering tier's outcome is the mean feedback score; the tiers that did not answer are unknown
    (NaN). A request answered by a tier not in `tiers` is skipped and counted. Each row carries the
    task category its request was served with when that was given (client, model alias, rule:
    `TRAINED_CATEGORY_SOURCES`), so an embedding router trained from the log gets a category index
    as one trained `--from-eval` does; a category the neighbours guessed or the default is none
    (training on the index's own guesses would only echo them). `db`: a SQLite file or a
    postgresql:// URL."""
    from localroute.monitoring.postgres_log import is_postgres_url
    from localroute.monitoring.routing_log import open_store

    if not is_postgres_url(db) and not Path(db).is_file():
        raise ConfigError(f"routing log not found: {db}", param="routing_log_path")
    store = open_store(db, read_only=True)
    try:
        rows = store.labelled()
    except sqlite3.OperationalError as exc:
        raise ConfigError(f"routing log {db} has no feedback yet ({exc})", param="routing_log_path") from None
    finally:
        store.close()
    index = {t: i for i, t in enumerate(tiers)}
    texts, labels, ids, categories, skipped = [], [], [], [], 0
    for request_id, prompt_text, tier, score, evidence in rows:
        if tier not in index:
            skipped += 1
            continue
        label = np.full(len(tiers), np.nan, dtype=np.float32)
        label[index[tier]] = float(score)
        texts.append(_last_user(str(prompt_text)))
        labels.append(label)
        ids.append(str(request_id))
        categories.append(trained_category(evidence))
    return LabelledQueries(texts, list(tiers), np.asarray(labels, dtype=np.float32).reshape(-1, len(tiers)),
                           f"log:{shown_log(db)}", skipped, ids,
                           categories if any(c is not None for c in categories) else [])


TRAINED_CATEGORY_SOURCES = frozenset({"client", "alias", "rule"})  # routing/categories.py's given ones


def trained_category(evidence: str | None) -> str | None:
    """A logged request's category for training: its evidence's `category` when `category_source`
    says it was given (not guessed by the neighbours, not the default), else None."""
    try:
        parsed = json.loads(evidence) if evidence else None
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("category_source") not in TRAINED_CATEGORY_SOURCES:
        return None
    name = parsed.get("category")
    return name if isinstance(name, str) and name else None


def shown_log(target: Path | str) -> str:
    """The log's name for output: a URL without its password."""
    from localroute.monitoring.routing_log import open_store

    return open_store(target, read_only=True).target


def _last_user(logged: str) -> str:
    """The routing log stores chat prompts as 'role: content' lines; routers embed the last user turn."""
    marker = "user: "
    pos = logged.rfind("\n" + marker)
    if pos >= 0:
        return logged[pos + 1 + len(marker):]
    return logged.removeprefix(marker)


# ---------- live quality (issue 19): shadow pairs and categories ----------


def read_shadow_pairs(path: Path | str, since: float | None = None,
                      until: float | None = None) -> list[dict[str, Any]]:
    """The shadow_pairs rows in [since, until), oldest first, each with `label`: the human feedback's
    `correct` on that request when there is one (it beats the frontier), else `agrees`. `path`: a
    SQLite file or a postgresql:// URL, read through the log's store without migrating; an older
    SQLite log without the table reads as no pairs."""
    from localroute.monitoring.routing_log import open_store

    store = open_store(path, read_only=True)
    try:
        rows = store.read_shadow_pairs(since, until)
    finally:
        store.close()
    for r in rows:
        fb = r.get("feedback_correct")
        r["label"] = int(fb) if fb is not None else r.get("agrees")
    return rows


def row_category(row: dict[str, Any], default: str = "default") -> str:
    """A requests row's task category (in its decision evidence since issue 19)."""
    evidence = row.get("evidence") or {}
    return str(evidence.get("category") or default)


def _clopper_pearson(k: float, n: float, level: float) -> tuple[float, float]:
    from localroute.monitoring.shadow import clopper_pearson

    return clopper_pearson(k, n, level)


def live_quality(rows: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]], targets: dict[str, float],
                 level: float = 0.95, default_category: str = "default") -> dict[str, Any]:
    """Per category: the share of shadowed kept local answers that agree with the frontier (or pass
    human feedback), reweighted by 1 / draw probability, with a Clopper-Pearson interval at `level`
    (exact when every draw had the same probability; at Kish's effective size otherwise); the
    implied agreement of all the category's answers (escalated ones are the frontier's own:
    1 - accepted share x disagreement), its interval, the calibration's target, and `below_target`
    when that interval's upper bound falls below the target. Shadow draws by outcome and spend."""
    answered: dict[str, list[int]] = {}
    for r in rows:
        if r.get("status") != 200 or not r.get("tier"):
            continue
        c = answered.setdefault(row_category(r, default_category), [0, 0])
        c[0] += 1
        c[1] += int(not r.get("escalated") and any(a.get("accepted") and a.get("threshold") is not None
                                                    for a in r.get("attempts") or []))
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for p in pairs:
        by_cat.setdefault(str(p["category"]), []).append(p)
    out: dict[str, Any] = {}
    for cat in sorted(set(answered) | set(by_cat)):
        ps = by_cat.get(cat, [])
        statuses: dict[str, int] = {}
        for p in ps:
            statuses[p["status"]] = statuses.get(p["status"], 0) + 1
        labelled = [p for p in ps if p["status"] == "scored" and p.get("label") is not None]
        n_answered, n_kept = answered.get(cat, [0, 0])
        accept_share = n_kept / n_answered if n_answered else None
        entry: dict[str, Any] = {
            "answered": n_answered, "kept_local": n_kept, "accept_share": accept_share, "draws": statuses,
            "pairs": len(labelled), "shadow_cost_usd": round(sum(p.get("cost_usd") or 0.0 for p in ps), 6),
            "target": targets.get(cat, targets.get("*")),
        }
        if labelled:
            w = np.array([1.0 / p["sample_rate"] for p in labelled])
            y = np.array([float(p["label"]) for p in labelled])
            uniform = bool(np.allclose(w, w[0]))
            n_eff = float(w.sum() ** 2 / (w * w).sum())
            share = float((w * y).sum() / w.sum())
            lo, hi = _clopper_pearson(share * n_eff if not uniform else float(y.sum()),
                                      n_eff if not uniform else float(len(y)), level)
            entry.update(kept_agreement=round(share, 6), kept_interval=[round(lo, 6), round(hi, 6)],
                         interval="clopper-pearson" if uniform else "clopper-pearson at Kish effective n",
                         level=level, n_effective=round(n_eff, 3))
            if accept_share is not None:
                cl, cp, ch = (1 - accept_share * (1 - v) for v in (lo, share, hi))
                entry.update(agreement=round(cp, 6), agreement_interval=[round(cl, 6), round(ch, 6)])
                target = entry["target"]
                entry["below_target"] = bool(target is not None and ch < target)
        out[cat] = entry
    return {"level": level, "categories": out,
            "below_target": sorted(c for c, e in out.items() if e.get("below_target")),
            "shadow_cost_usd": round(sum(e["shadow_cost_usd"] for e in out.values()), 6)}


def live_quality_series(pairs: Sequence[dict[str, Any]], bucket: str = "day") -> dict[str, list[dict[str, Any]]]:
    """Per category and time bucket: pairs and reweighted kept agreement (for the PNG over time)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for p in pairs:
        if p["status"] == "scored" and p.get("label") is not None:
            groups.setdefault((str(p["category"]), _bucket_start(p["ts"], bucket)), []).append(p)
    out: dict[str, list[dict[str, Any]]] = {}
    for (cat, start), ps in sorted(groups.items()):
        w = np.array([1.0 / p["sample_rate"] for p in ps])
        y = np.array([float(p["label"]) for p in ps])
        out.setdefault(cat, []).append({"start": start, "pairs": len(ps), "kept_agreement": float((w * y).sum() / w.sum())})
    return out
