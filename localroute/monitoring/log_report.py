"""Reading the routing log: rows by time, the summaries `localroute report` prints (escalation
rate and its health band, confidence against the calibrated distribution, cost per query, by
period and tier), and the review sample with its feedback. The log's writer is routing_log.py."""

from __future__ import annotations

import json
import math
import sqlite3
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from localroute.monitoring.routing_log import COLUMNS

__all__ = ["escalation_health", "load_calibration", "read_rows", "report", "review_summary", "summarize"]


def read_rows(path: Path, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """Rows in [since, until) (unix seconds) as dicts, oldest first; missing columns of an older
    schema read as None. Opening does not migrate: reporting never writes to the log."""
    path = Path(path)
    if not path.is_file():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        clauses, args = [], []
        if since is not None:
            clauses.append("ts >= ?")
            args.append(since)
        if until is not None:
            clauses.append("ts < ?")
            args.append(until)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = [dict(r) for r in conn.execute(f"SELECT * FROM requests{where} ORDER BY ts", args)]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()
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


def load_calibration(path: Path | None) -> dict[str, dict[str, Any]]:
    """Per-tier confidence quantiles/histogram from a calibration file, read defensively: JSON or
    TOML; per-tier sections under `tiers` (dict or list with `name`/`tier`) or one top-level
    section for the first tier (key `_default`). Anything unreadable gives {}."""
    if path is None or not Path(path).is_file():
        return {}
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    data: Any
    try:
        data = json.loads(raw)
    except ValueError:
        try:
            data = tomllib.loads(raw)
        except tomllib.TOMLDecodeError:
            return {}
    if not isinstance(data, dict):
        return {}
    sections: dict[str, Any] = {}
    tiers = data.get("tiers")
    if isinstance(tiers, dict):
        sections.update({str(k): v for k, v in tiers.items() if isinstance(v, dict)})
    elif isinstance(tiers, list):
        for t in tiers:
            if isinstance(t, dict) and (t.get("name") or t.get("tier")):
                sections[str(t.get("name") or t.get("tier"))] = t
    if not sections:
        name = data.get("tier") or data.get("tier_name") or "_default"
        sections[str(name)] = data
    out = {}
    for name, sec in sections.items():
        found = _calibration_distribution(sec)
        if found:
            out[name] = found
    return out


def _calibration_distribution(sec: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in sec.items():
        k = str(key).lower()
        if "quantile" in k and "quantiles" not in found:
            q = _as_quantiles(value)
            if q:
                found["quantiles"] = q
        elif "hist" in k and isinstance(value, dict) and "histogram" not in found:
            edges = value.get("edges") or value.get("bins") or value.get("bin_edges")
            counts = value.get("counts") or value.get("density") or value.get("hist")
            if isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1:
                try:
                    found["histogram"] = {"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]}
                except (TypeError, ValueError):
                    pass
        elif k == "threshold" and isinstance(value, int | float):
            found["threshold"] = float(value)
        elif isinstance(value, dict) and depth < 2:
            for k2, v2 in _calibration_distribution(value, depth + 1).items():
                found.setdefault(k2, v2)
    if "quantiles" not in found and "histogram" in found:
        found["quantiles"] = _hist_quantiles(found["histogram"])
    return found


def _as_quantiles(value: Any) -> dict[float, float]:
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [tuple(p) for p in value if isinstance(p, list | tuple) and len(p) == 2]
    out = {}
    for q, v in pairs:
        text = str(q).strip().lower()
        try:
            if text.startswith("p"):  # p01, p50, p99: percentiles
                qf = float(text[1:]) / 100
            else:  # 0.5 or 50
                qf = float(text.lstrip("q"))
                qf = qf / 100 if qf > 1 else qf
            out[qf] = float(v)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


def _hist_quantiles(hist: dict[str, list[float]]) -> dict[float, float]:
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    if counts.sum() <= 0:
        return {}
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    return {q: float(np.interp(q, cdf, edges)) for q in QUANTILES}


def _nearest(quantiles: dict[float, float], q: float) -> float | None:
    if not quantiles:
        return None
    return quantiles[min(quantiles, key=lambda k: abs(k - q))]


def _bucket_start(ts: float, bucket: str) -> float:
    size = 3600 if bucket == "hour" else 86400
    return math.floor(ts / size) * size


def summarize(rows: Sequence[dict[str, Any]], bucket: str = "day",
              calibration: dict[str, dict[str, Any]] | None = None,
              first_tier: str | None = None) -> dict[str, Any]:
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
    calibration = calibration or {}
    confidence = {}
    for tier, values in conf.items():
        cal = calibration.get(tier) or (calibration.get("_default") if tier == first_tier else None)
        entry: dict[str, Any] = {"n": len(values), "mean": float(np.mean(values)), **_pct(values, QUANTILES)}
        if cal and cal.get("quantiles"):
            cq = cal["quantiles"]
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


def report(path: Path, since: float | None = None, until: float | None = None, bucket: str = "day",
           calibration_path: Path | None = None, first_tier: str | None = None) -> tuple[dict[str, Any],
                                                                                       list[dict[str, Any]]]:
    """`localroute report`'s one library call: the summary and the rows it came from."""
    rows = read_rows(path, since, until)
    summary = summarize(rows, bucket, load_calibration(calibration_path), first_tier)
    summary["log"] = str(path)
    summary["window"] = {"since": since, "until": until}
    summary["review"] = review_summary(path)
    return summary, rows


def review_summary(path: Path, limit: int = 20) -> dict[str, Any]:
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

