#!/usr/bin/env python3
"""The routing-signal table: AUROC, APGR and CPT(95%) with 95% bootstrap intervals of every signal
(the six logprob aggregators, the verifier, label confidence, field confidence) on one data set,
from one command per set:

    python scripts/signal_table.py banking77 --rows 200 [--seed 0] [--data-dir ../shared/data]
    python scripts/signal_table.py --table            # the README table from every set's report
    python scripts/signal_table.py banking77 --rows 200 --report-only  # report the rows done so far

Each run converts `--rows` seeded rows of the staged data (read in place, never copied into the
repository; choice sets get the label-first system prompt), runs `localroute eval` on the first
tier (SmolLM2-135M) with the same tier as verifier, and writes runs/signals/<set>/rows-<N>/report.json.
Rerunning resumes; a larger --rows is a new run folder. `--report-only` writes the report of the rows
an interrupted run finished, without running more (the table's rows then read "n of N"). The frontier
is the recorded GPT-4 outcome where the data has one (mmlu, gsm8k), else the oracle (always right:
APGR/CPT are upper bounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS = ("banking77", "tweeteval-sentiment", "mmlu", "gsm8k", "bbh", "conll2003", "restaurant8k")
RECORDED = {"mmlu": "recorded:gpt-4", "gsm8k": "recorded:gpt-4"}
SIGNALS = ("mean_logprob", "sum_logprob", "min_logprob", "quantile_logprob", "mean_margin", "neg_mean_entropy",
           "verifier", "label_confidence", "field_confidence")
OUT = ROOT / "runs" / "signals"


def run_set(name: str, rows: int, seed: int, data_dir: Path, bootstrap: int, concurrency: int,
            report_only: bool = False) -> dict[str, Any]:
    from localroute.evaluation.datasets import convert, write_items
    from localroute.evaluation.report import build_report
    from localroute.evaluation.runner import EvalConfig, run_eval
    from localroute.settings import Settings

    settings = Settings()
    tier = settings.ladder()[0].name
    folder = OUT / name / f"rows-{rows}-seed-{seed}"
    if report_only and not (folder / "run").is_dir():
        raise SystemExit(f"no run in {folder} to report")
    folder.mkdir(parents=True, exist_ok=True)
    dataset = folder / "items.jsonl"
    if not dataset.is_file():
        write_items(convert(name, data_dir, limit=rows, seed=seed), dataset)
    t0 = time.perf_counter()
    cfg = EvalConfig(dataset=dataset, out_dir=folder / "run", seed=seed, concurrency=concurrency,
                     frontier=RECORDED.get(name, "oracle"), verifier=tier, progress=sys.stderr.isatty())
    if not report_only:
        asyncio.run(run_eval(settings, cfg))
    report = build_report(folder / "run", bootstrap=bootstrap)
    report["set"] = name
    n_items = sum(1 for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip())
    report["rows_asked"] = n_items
    report["partial"] = report["n"] + report["n_excluded"] < n_items
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    (folder / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _cell(m: dict[str, Any], key: str, pct: bool = False) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    ci = (m.get("ci") or {}).get(key)

    def f(x: float) -> str:
        return f"{100 * x:.0f}%" if pct else f"{x:.2f}"

    return f"{f(v)} [{f(ci[0])}, {f(ci[1])}]" if ci else f(v)


def table(reports: list[dict[str, Any]]) -> str:
    lines = [("| set | rows | cheap right | frontier | signal | AUROC [95% CI] | AUROC - mean_logprob's [paired 95% CI] "
             "| APGR [95% CI] | CPT(95%) [95% CI] |"),
             "|---|---:|---:|---|---|---|---|---|---|"]
    for r in reports:
        front = "oracle (upper bound)" if r.get("upper_bound") else str(r["frontier"].get("model"))
        best = r.get("best_aggregator")
        rows = f"{r['n']} of {r['rows_asked']}" if r.get("partial") else str(r["n"])
        for sig in SIGNALS:
            m = r["aggregators"].get(sig)
            if m is None:
                continue
            name = f"**{sig}**" if sig == best else sig
            if sig == "field_confidence":  # the other answers fall back to mean_logprob
                name += f" ({r.get('n_structured', 0)} structured)"
            right = r.get("cheap_right", r["cheap_quality"]) or 0  # older reports: the mean score
            lines.append(f"| {r['set']} | {rows} | {100 * right:.1f}% | {front} | {name} | "
                         f"{_cell(m, 'auroc')} | {_delta(m)} | {_cell(m, 'apgr')} | {_cell(m, 'cpt95', pct=True)} |")
    return "\n".join(lines)


def _delta(m: dict[str, Any]) -> str:
    from localroute.evaluation.report import BASELINE
    d = m.get("vs_" + BASELINE)
    if d is None:
        return "-" if "vs_" + BASELINE not in m else "n/a"
    return f"{d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def main() -> int:
    from localroute.evaluation.report import bar_verdict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", nargs="?", choices=SETS)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LOCALROUTE_EVAL_DATA_DIR", ROOT.parent / "shared" / "data")))
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--table", action="store_true", help="print the table of every set's latest report")
    p.add_argument("--report-only", action="store_true",
                   help="report the rows the set's run has finished so far, without running more")
    args = p.parse_args()
    if args.table:
        reports = []
        for name in SETS:
            found = sorted((OUT / name).glob("rows-*/report.json"), key=lambda f: f.stat().st_mtime)
            if found:
                reports.append(json.loads(found[-1].read_text(encoding="utf-8")))
        print(table(reports))
        print("\n" + "\n".join(bar_verdict(r) for r in reports))
        return 0
    if args.set is None:
        p.error("name a set, or --table")
    report = run_set(args.set, args.rows, args.seed, args.data_dir, args.bootstrap, args.concurrency,
                     args.report_only)
    print(table([report]))
    print("\n" + bar_verdict(report))
    if report.get("label_cost_s"):
        print(f"\nlabel scoring per request: {report['label_cost_s']}")
    print(f"wall {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
