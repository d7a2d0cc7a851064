"""`localroute report`: requests, escalation health, confidence drift, cost and savings, latency
and GPU figures from the routing log, as a table, JSON (`--json`) or PNG charts (`--plot DIR`)."""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from
from localroute.errors import ConfigError, InvalidRequestError

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float | None = None) -> float:
    """`24h`/`7d` (ago), unix seconds, or ISO 8601 (naive times are UTC)."""
    now = time.time() if now is None else now
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"cannot read time {text!r}: use 24h, 7d, unix seconds or ISO 8601",
                                  param="since") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="summarise the routing log: escalations, confidence, cost, latency")
    add_config_flag(p)
    p.add_argument("--log", default=None,
                   help="routing log: a SQLite file or a postgresql:// URL (default: routing_log_url or routing_log_path)")
    p.add_argument("--since", default=None, help="start of the window: 24h, 7d, unix seconds or ISO 8601")
    p.add_argument("--until", default=None, help="end of the window (exclusive)")
    p.add_argument("--bucket", choices=("hour", "day"), default="day", help="time bucket of the series")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration file to compare confidences with (default: setting calibration_path, once "
                   "`localroute calibrate` wrote it); read as `serve` reads it: an invalid file is an error")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG charts into DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localroute.monitoring.log_report import report

    settings = settings_from(args)
    from localroute.monitoring.postgres_log import is_postgres_url

    path = args.log or settings.routing_log_target()
    if path is None:
        raise ConfigError("no routing log: pass --log or set routing_log_path (LOCALROUTE_ROUTING_LOG_PATH)",
                          param="routing_log_path")
    if not is_postgres_url(path) and not Path(path).is_file():
        raise ConfigError(f"routing log not found: {path}", param="routing_log_path")
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    calibration = args.calibration
    if calibration is None and settings.calibration_path is not None and settings.calibration_path.exists():
        calibration = settings.calibration_path  # configured but not yet written: nothing to compare with
    summary, rows = report(path if is_postgres_url(path) else Path(path), since, until, args.bucket, calibration)
    if args.plot is not None:
        summary["plots"] = [str(p) for p in write_plots(summary, rows, args.plot)]
    if args.json:
        print_json(summary)
    else:
        print(render(summary))
    return 0


def _usd(x: float | None) -> str:
    return "-" if x is None else f"${x:.6f}"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(s: dict[str, Any]) -> str:
    """The terminal table."""
    rate, gpu = s["escalation_rate"], s["gpu_utilization_mean"]
    lines = [
        f"routing log      {s['log']}",
        f"requests         {s['requests']} ({s['answered']} answered, {s['errors']} errors, {s['streamed']} streamed)",
        (f"escalation rate  {_num(rate * 100 if rate is not None else None, '{:.1f}%')}  "
         f"[{s['escalation_health']}] {s['escalation_note']}"),
        "answered by      " + (", ".join(f"{k}: {v}" for k, v in s["answered_by_tier"].items()) or "-"),
        f"total cost       {_usd(s['cost_usd'])}   per query {_usd(s['cost_per_query_usd'])}",
        (f"frontier-only    {_usd(s['counterfactual_cost_usd'])} (estimate)   savings "
         f"{_num(s['savings_pct'], '{:.1f}%')}"),
        "latency          " + "  ".join(f"{k} {_num(v, '{:.3f}s')}" for k, v in s["latency_s"].items()),
        "ttft             " + "  ".join(f"{k} {_num(v, '{:.3f}s')}" for k, v in s["ttft_s"].items()),
        f"gpu utilisation  {_num(gpu * 100 if gpu is not None else None, '{:.1f}%')}   energy "
        + _num(s["energy_j"], "{:.1f} J"),
        "",
        f"{'confidence':<18}{'n':>6}{'p10':>9}{'p50':>9}{'p90':>9}{'calib p50':>11}{'shift':>9}{'<calib p10':>12}",
    ]
    for tier, c in s["confidence"].items():
        cal = c.get("calibration") or {}
        share = c.get("share_below_calibration_p10")
        lines.append(
            f"{tier:<18}{c['n']:>6}{_num(c['p10']):>9}{_num(c['p50']):>9}{_num(c['p90']):>9}"
            f"{_num(cal.get('p50')):>11}{_num(c.get('median_shift')):>9}"
            f"{_num(share * 100 if share is not None else None, '{:.0f}%'):>12}"
        )
    lines += _render_categories(s)
    review = s.get("review") or {}
    if review.get("sampled"):
        lines += ["", (f"review sample: {review['sampled']} marked, {review['reviewed']} reviewed, "
                       f"{review['pending']} awaiting feedback (POST /v1/feedback)")]
        lines += [f"  {rid}" for rid in review["pending_request_ids"]]
    if s["series"]:
        lines += ["", f"{s['bucket']:<22}{'requests':>9}{'escalated':>11}{'cost/query':>14}{'frontier/query':>16}"]
        for b in s["series"]:
            start = datetime.fromtimestamp(b["start"], UTC).strftime("%Y-%m-%d %H:%M")
            er = b["escalation_rate"]
            lines.append(f"{start:<22}{b['requests']:>9}{_num(er * 100 if er is not None else None, '{:.1f}%'):>11}"
                         f"{_usd(b['cost_per_query_usd']):>14}{_usd(b['counterfactual_per_query_usd']):>16}")
    return "\n".join(lines)


def _pct_or_dash(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _render_categories(s: dict[str, Any]) -> list[str]:
    """Requests, escalation and live quality (shadow pairs) per task category."""
    cats, live = s.get("categories") or {}, s.get("live_quality") or {"categories": {}}
    names = sorted(set(cats) | set(live["categories"]))
    if not names or names == ["default"] and not live["categories"]:
        return []
    level = round(live.get("level", 0.95) * 100)
    lines = ["", (f"{'category':<16}{'answered':>9}{'escal.':>8}{'pairs':>7}{'kept agree':>12}"
             f"{f'{level}% CI':>17}{'all agree':>11}{f'{level}% CI':>17}{'target':>8}")]
    for name in names:
        c, q = cats.get(name) or {}, live["categories"].get(name) or {}
        ki, ai = q.get("kept_interval"), q.get("agreement_interval")
        flag = "  BELOW TARGET" if q.get("below_target") else ""
        lines.append(
            f"{name:<16}{c.get('answered', 0):>9}{_pct_or_dash(c.get('escalation_rate')):>8}{q.get('pairs', 0):>7}"
            f"{_pct_or_dash(q.get('kept_agreement')):>12}"
            f"{(f'[{ki[0]:.3f}, {ki[1]:.3f}]' if ki else '-'):>17}{_pct_or_dash(q.get('agreement')):>11}"
            f"{(f'[{ai[0]:.3f}, {ai[1]:.3f}]' if ai else '-'):>17}{_num(q.get('target')):>8}{flag}")
    draws: dict[str, int] = {}
    for q in live["categories"].values():
        for k, v in (q.get("draws") or {}).items():
            draws[k] = draws.get(k, 0) + v
    if draws:
        lines.append("shadow draws     " + ", ".join(f"{k} {v}" for k, v in sorted(draws.items()))
                     + f"   shadow spend {_usd(live.get('shadow_cost_usd'))} (apart from the serving budget)")
    for name in live.get("below_target") or []:
        lines.append(f"WARNING: category {name}: live quality's upper bound is below its calibration target; "
                     "recalibrate (`localroute calibrate --from-log`)")
    return lines


def write_plots(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Escalation rate over time, cost per query (actual vs frontier-only), confidence histograms."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'localroute[eval]'", param="plot") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    series = summary["series"]
    times: Any = [datetime.fromtimestamp(b["start"], UTC) for b in series]  # matplotlib takes datetimes
    written = []

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.axhspan(15, 35, color="tab:green", alpha=0.15, label="usual band 15-35%")
    rates: Any = [None if b["escalation_rate"] is None else b["escalation_rate"] * 100 for b in series]
    ax.plot(times, rates, marker="o", label="escalation rate")
    ax.set_ylabel("% of answered queries escalated")
    ax.set_title(f"Escalation rate per {summary['bucket']}")
    ax.legend()
    fig.autofmt_xdate()
    written.append(_save(fig, out_dir / "escalation_rate.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(times, [b["cost_per_query_usd"] for b in series], marker="o", label="actual")
    ax.plot(times, [b["counterfactual_per_query_usd"] for b in series], marker="s",
            label="frontier-only (estimate)")
    ax.set_ylabel("USD per query")
    ax.set_title(f"Cost per query per {summary['bucket']}")
    ax.legend()
    fig.autofmt_xdate()
    written.append(_save(fig, out_dir / "cost_per_query.png"))

    values: dict[str, list[float]] = {}
    for r in rows:
        for a in r["attempts"]:
            if a.get("confidence") is not None and a.get("tier"):
                values.setdefault(a["tier"], []).append(a["confidence"])
    tiers = sorted(values) or ["(none)"]
    fig, axes = plt.subplots(len(tiers), 1, figsize=(8, 3 * len(tiers)), squeeze=False)
    for ax, tier in zip(axes[:, 0], tiers):
        v = [max(x, -20.0) for x in values.get(tier, [])]
        if v:
            ax.hist(v, bins=30, alpha=0.7, label="observed")
        cal = (summary["confidence"].get(tier) or {}).get("calibration") or {}
        for name, q in cal.items():
            ax.axvline(q, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(f"calib {name}", (q, 0), rotation=90, fontsize=7, color="tab:red")
        ax.set_title(f"Confidence, tier {tier}")
        ax.set_xlabel("confidence (aggregated token logprob)")
    written.append(_save(fig, out_dir / "confidence_histograms.png"))

    live = summary.get("live_quality") or {}
    if live.get("series"):
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, points in sorted(live["series"].items()):
            when: Any = [datetime.fromtimestamp(p["start"], UTC) for p in points]
            line = ax.plot(when, [p["kept_agreement"] * 100 for p in points], marker="o", label=name)
            target = (live["categories"].get(name) or {}).get("target")
            if target is not None:
                ax.axhline(target * 100, color=line[0].get_color(), linestyle="--", linewidth=1)
        ax.set_ylabel("% of shadowed kept answers agreeing")
        ax.set_title(f"Live quality per category per {summary['bucket']} (dashed: calibration target)")
        ax.legend()
        fig.autofmt_xdate()
        written.append(_save(fig, out_dir / "live_quality.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
