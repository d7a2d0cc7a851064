"""The report of an eval run: quality of both tiers and, per confidence aggregator, how well it
separates right from wrong answers (AUROC, ECE) and what routing on it buys (deferral curve, AUC,
APGR, CPT). Everything is recomputed from the stored tokens, so a new aggregator needs no rerun.

With `--frontier oracle` the frontier is assumed always right: every figure that involves it is an
upper bound, and the report says so wherever it shows one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from localroute.evaluation.metrics import (
    as_probability,
    bootstrap_intervals,
    curve_metrics,
    oracle_curve,
    paired_auroc_delta,
    random_curve,
    routing_metrics,
)
from localroute.evaluation.runs import RunTable

UPPER_BOUND_NOTE = "oracle frontier (assumed always right): an upper bound"
BASELINE = "mean_logprob"  # the default signal every other one is compared with
BAR_MIN_RIGHT = 0.2  # the comparison is asked of sets where the cheap tier is right this often


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(x, nd)


def build_report(out_dir: Path, bootstrap: int = 0) -> dict[str, Any]:
    """The report of a run; `bootstrap` > 0 adds 95% percentile-bootstrap intervals of AUROC, APGR
    and CPT(95%) per signal (`ci`), from that many resamples, each signal's paired AUROC difference
    from mean_logprob (`vs_mean_logprob`: the same resamples for both), and the set's `bar`."""
    t = RunTable(out_dir)
    if t.n == 0:
        return {"run": str(out_dir), "n": 0, "n_excluded": t.n_excluded, "aggregators": {},
                "cheap_quality": None, "frontier_quality": None}
    cq, fq = float(t.cheap.mean()), float(t.frontier.mean())
    aggs: dict[str, Any] = {}
    raw_auroc: dict[str, tuple[float | None, tuple[float, float] | None]] = {}  # unrounded, for the bar
    for name in t.conf:
        if (name == "label_confidence" and not t.n_labelled) or (name == "field_confidence" and not t.n_structured):
            continue  # no row had labels / structure: the signal would only repeat mean_logprob
        m, _ = routing_metrics(t.conf[name], t.cheap, t.frontier, t.correct, name)
        aggs[name] = m.as_dict()
        if bootstrap > 0:
            ci = bootstrap_intervals(t.conf[name], t.cheap, t.frontier, t.correct, n_boot=bootstrap)
            raw_auroc[name] = (m.auroc, ci["auroc"])
            aggs[name]["ci"] = {k: None if v is None else [round(v[0], 4), round(v[1], 4)] for k, v in ci.items()}
            if name != BASELINE and BASELINE in t.conf:
                delta = paired_auroc_delta(t.conf[name], t.conf[BASELINE], t.correct, n_boot=bootstrap)
                aggs[name]["vs_" + BASELINE] = None if delta is None else {
                    "delta": round(delta[0], 4), "ci": [round(delta[1][0], 4), round(delta[1][1], 4)]}
    # AUROC is undefined when the cheap tier is always right or always wrong: then no signal "wins".
    ranked = [a for a in aggs if aggs[a]["auroc"] is not None]
    best = max(ranked, key=lambda a: (aggs[a]["auroc"], aggs[a]["apgr"] if aggs[a]["apgr"] is not None else -1),
               default=None)
    bar = _bar(t, aggs, raw_auroc, best, bootstrap) if bootstrap > 0 else None
    frontier = dict(t.meta["frontier"])
    frontier["label"] = UPPER_BOUND_NOTE if t.upper_bound else (
        f"recorded outcomes of {frontier.get('model')}" if frontier["mode"] == "recorded"
        else f"live calls to {frontier.get('model')}")
    return {
        "run": str(out_dir),
        "dataset": t.meta.get("dataset"),
        "tier": t.meta.get("tier"),
        "model": (t.meta.get("fingerprint") or {}).get("model_file"),
        "n": t.n,
        "n_excluded": t.n_excluded,
        "n_generation_errors": t.generation_errors,
        "cheap_quality": _r(cq),
        "cheap_right": _r(float(t.correct.mean())),  # the share scored right (cheap_quality: the mean score)
        "frontier_quality": _r(fq),
        "frontier": frontier,
        "upper_bound": t.upper_bound,
        "mean_completion_tokens": _r(float(np.mean(t.completion_tokens)), 2),
        "n_labelled": t.n_labelled,  # rows whose request named labels (label confidence)
        "n_structured": t.n_structured,  # answers field confidence reads as fields (JSON, `key: value` lines)
        "label_cost_s": _label_cost(t),
        "choice_method": t.meta.get("sampling", {}).get("choice_method"),
        "aggregators": aggs,
        "best_aggregator": best,
        "best_by": "AUROC (ties: APGR)",
        "bar": bar,
        "random": {k: _r(v) for k, v in curve_metrics(random_curve(t.cheap, t.frontier), cq, fq).items()},
        "oracle_router": {k: _r(v) for k, v in curve_metrics(oracle_curve(t.cheap, t.frontier), cq, fq).items()},
    }


def _bar(t: RunTable, aggs: dict[str, Any], raw_auroc: dict[str, tuple[float | None, tuple[float, float] | None]],
         best: str | None, bootstrap: int) -> dict[str, Any]:
    """Issue #18's test of a set's best signal, decided on unrounded values. It applies where the
    cheap tier's answers are right (`correct`, not the mean score: a span F1 of 0.5 is not right)
    at least BAR_MIN_RIGHT of the time. `met`: the issue's own wording, the best signal's AUROC
    above the upper end of mean_logprob's 95% interval (a point against an interval: no stated
    error rate). `paired`: the stronger test, the paired interval of the best's difference from
    mean_logprob, widened for having picked the best of `compared` signals (Bonferroni: level
    1 - 0.05 / compared), excludes 0. None where it cannot be decided (no AUROC, no interval)."""
    right = float(t.correct.mean())
    out: dict[str, Any] = {"applies": right >= BAR_MIN_RIGHT, "cheap_right": round(right, 4), "best": best,
                           "met": None, "paired": None, "compared": 0}
    base = aggs.get(BASELINE)
    if not out["applies"] or best is None or base is None or base["auroc"] is None:
        return out
    if best == BASELINE:
        out["met"] = out["paired"] = False
        return out
    rivals = [a for a in aggs if a != BASELINE and aggs[a]["auroc"] is not None]
    out["compared"] = len(rivals)
    base_ci = raw_auroc[BASELINE][1]
    best_auroc = raw_auroc[best][0]
    if base_ci is not None and best_auroc is not None:
        out["met"] = best_auroc > base_ci[1]
    level = 1 - (1 - 0.95) / len(rivals)
    delta = paired_auroc_delta(t.conf[best], t.conf[BASELINE], t.correct, n_boot=bootstrap, level=level)
    if delta is not None:
        out["paired"] = delta[1][0] > 0
        out["paired_ci"] = [round(delta[1][0], 4), round(delta[1][1], 4)]
        out["paired_level"] = round(level, 4)
    return out


def bar_verdict(report: dict[str, Any], name: str | None = None) -> str:
    """One line on the report's bar, for a table's reader."""
    what = name or str(report.get("set") or report.get("run"))
    if not report.get("n"):
        return f"{what}: no usable rows"
    if "bar" not in report:
        return f"{what}: report written before the bar existed (rerun it with --report-only)"
    bar = report["bar"]
    if bar is None:
        return f"{what}: no bar (the report has no bootstrap intervals)"
    if not bar["applies"]:
        return (f"{what}: cheap tier right {100 * bar['cheap_right']:.1f}% of the time, under "
                f"{100 * BAR_MIN_RIGHT:.0f}%: the bar does not apply")
    if bar["best"] is None or BASELINE not in report["aggregators"]:
        return f"{what}: no AUROC for the best signal and {BASELINE} to compare"
    if bar["best"] == BASELINE:
        return f"{what}: {BASELINE} is the best signal: the bar is not met"
    met = {True: "beats", False: "does not beat", None: "cannot be compared with"}[bar["met"]]
    line = f"{what}: best {bar['best']} {met} {BASELINE}'s AUROC beyond its 95% interval"
    if bar.get("paired_ci") is not None:
        low, high = bar["paired_ci"]
        line += (f"; paired difference [{low:+.2f}, {high:+.2f}] at {100 * bar['paired_level']:.1f}% "
                 f"(best of {bar['compared']}) {'excludes' if bar['paired'] else 'includes'} 0")
    return line


def _label_cost(t: RunTable) -> dict[str, float] | None:
    """What label scoring cost per request (engine seconds; mean, p50, p95), from the rows."""
    costs = [float(r["label"]["cost_s"]) for r in t.usable if isinstance(r.get("label"), dict)
             and isinstance(r["label"].get("cost_s"), (int, float))]
    if not costs:
        return None
    arr = np.asarray(costs)
    return {"mean": round(float(arr.mean()), 5), "p50": round(float(np.quantile(arr, 0.5)), 5),
            "p95": round(float(np.quantile(arr, 0.95)), 5), "n": len(costs)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def render_table(report: dict[str, Any]) -> str:
    """Plain-text summary for the terminal."""
    if not report["n"]:
        return f"no usable rows in {report['run']}"
    ub = " [UPPER BOUND: oracle frontier]" if report["upper_bound"] else ""
    lines = [
        f"run {report['run']}  tier {report['tier']}  n={report['n']} (excluded {report['n_excluded']})",
        (f"cheap quality {report['cheap_quality']:.4f}   frontier quality {report['frontier_quality']:.4f} "
         f"({report['frontier']['label']}){ub}"),
        "",
        f"{'aggregator':<18}{'AUROC':>8}{'ECE':>8}{'AUC':>8}{'APGR':>8}{'CPT50':>8}{'CPT80':>8}{'CPT95':>8}",
    ]
    rows = list(report["aggregators"].items()) + [("random", report["random"]), ("oracle router", report["oracle_router"])]
    for name, m in rows:
        mark = " *" if name == report["best_aggregator"] else ""
        lines.append(f"{name + mark:<18}{_f(m.get('auroc')):>8}{_f(m.get('ece')):>8}{_f(m.get('auc')):>8}"
                     f"{_f(m.get('apgr')):>8}{_pct(m.get('cpt50')):>8}{_pct(m.get('cpt80')):>8}{_pct(m.get('cpt95')):>8}")
    if report["best_aggregator"] is None:
        lines.append("no best aggregator: AUROC is undefined (the cheap answers are all right or all wrong)")
    lines.append(f"* best by {report['best_by']}. CPT = share of queries escalated to recover that share of the "
                 f"cheap-to-frontier gap.")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], plots: list[str]) -> str:
    ub = f"\n> **Upper bound**: {UPPER_BOUND_NOTE}.\n" if report.get("upper_bound") else ""
    parts = [
        f"# Eval report: {report.get('tier')} on {Path(str(report.get('dataset'))).name}",
        ub,
        (f"- rows: {report['n']} usable, {report['n_excluded']} excluded "
         f"({report.get('n_generation_errors', 0)} generation errors kept as unconfident wrong answers)"),
        (f"- cheap quality: **{_f(report['cheap_quality'], 4)}**; frontier quality: "
         f"**{_f(report['frontier_quality'], 4)}** ({report['frontier']['label']})"),
        f"- choice tasks: {report.get('choice_method')}",
        f"- best aggregator ({report['best_by']}): **{report['best_aggregator'] or 'none (AUROC undefined)'}**",
        "",
        "| aggregator | AUROC | ECE | deferral AUC | APGR | CPT(50%) | CPT(80%) | CPT(95%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(report["aggregators"].items()) + [("random", report["random"]), ("oracle router", report["oracle_router"])]
    for name, m in rows:
        parts.append(f"| {name} | {_f(m.get('auroc'))} | {_f(m.get('ece'))} | {_f(m.get('auc'))} | {_f(m.get('apgr'))} "
                     f"| {_pct(m.get('cpt50'))} | {_pct(m.get('cpt80'))} | {_pct(m.get('cpt95'))} |")
    parts.append("")
    parts.extend(f"![{p}]({p})" for p in plots)
    return "\n".join(parts) + "\n"


def plot_report(out_dir: Path, report: dict[str, Any]) -> list[str]:
    """Deferral curves (every aggregator, random, oracle) and the best aggregator's reliability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = RunTable(out_dir)
    if t.n == 0:
        return []
    x = np.arange(t.n + 1) / t.n * 100
    suffix = " (oracle frontier: upper bound)" if t.upper_bound else ""
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in report["aggregators"]:
        _, curve = routing_metrics(t.conf[name], t.cheap, t.frontier, t.correct, name)
        ax.plot(x, curve, label=f"{name} (APGR {_f(report['aggregators'][name]['apgr'])})", linewidth=1.2)
    ax.plot(x, random_curve(t.cheap, t.frontier), "k--", label="random", linewidth=1)
    ax.plot(x, oracle_curve(t.cheap, t.frontier), "k:", label="oracle router", linewidth=1.5)
    ax.set_xlabel("% of queries escalated")
    ax.set_ylabel("quality")
    ax.set_title(f"Deferral curves: {t.meta.get('tier')}, n={t.n}{suffix}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "deferral.png", dpi=110)
    plt.close(fig)

    best = report["best_aggregator"] or "mean_logprob"
    prob = as_probability(t.conf[best], best)
    edges = np.linspace(0, 1, 11)
    idx = np.minimum((prob * 10).astype(int), 9)
    mids, accs, counts = [], [], []
    for b in range(10):
        mask = idx == b
        if mask.any():
            mids.append(float(prob[mask].mean()))
            accs.append(float(t.correct[mask].mean()))
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.plot(mids, accs, "o-")
    for m, a, c in zip(mids, accs, counts):
        ax.annotate(str(c), (m, a), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks(edges)
    ax.set_xlabel(f"confidence as probability ({best})")
    ax.set_ylabel("share correct")
    ax.set_title(f"Reliability, ECE {_f(report['aggregators'][best]['ece'])}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)
    return ["deferral.png", "reliability.png"]


def write_report(out_dir: Path, plots: bool = True) -> dict[str, Any]:
    """report.json, report.md and the PNGs into the run folder; returns the report."""
    report = build_report(out_dir)
    names = plot_report(out_dir, report) if plots and report["n"] else []
    (out_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    if report["n"]:
        (out_dir / "report.md").write_text(render_markdown(report, names), encoding="utf-8")
    return report
