"""Escalation rate at the same certified quality: one pooled threshold vs one per task category.

    python scripts/category_thresholds.py RUN_DIR [--target-quality 0.9] [--delta 0.1] [--splits 20]

RUN_DIR is a `localroute eval` run of a mixed dataset (rows' categories: item meta
`localroute_category`, else the id prefix). Each split halves the rows at random; the calibration
half fits (a) the pooled threshold (Learn-then-Test at delta) and (b) per-category thresholds
(delta / K each, categories under --min-rows keep the pooled one); the held-out half reports the
escalation rate and quality of both, overall and per category. Prints a markdown table (means over
the splits) and, with --json, the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from localroute.evaluation.runs import RunTable
from localroute.evaluation.thresholds import fit_categories, fit_threshold, run_categories


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--target-quality", type=float, default=0.9)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--aggregator", default="mean_logprob")
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--min-rows", type=int, default=30)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    table = RunTable(args.run)
    oracle = table.meta["frontier"]["mode"] == "oracle"
    conf, cheap, frontier = table.conf[args.aggregator], table.cheap, table.frontier
    cats = np.array(run_categories(table), dtype=object)
    names = sorted(set(cats))
    acc: dict[str, dict[str, list[float]]] = {k: {} for k in ("pooled", "per_category")}
    for seed in range(args.splits):
        perm = np.random.default_rng(1000 + seed).permutation(len(conf))
        cal, hold = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        pooled, cert, _ = fit_threshold(conf[cal], cheap[cal], frontier[cal], holdout=0.0, seed=seed, oracle=oracle,
                                        target_quality=args.target_quality, target_escalation=None, delta=args.delta)
        per = fit_categories(conf[cal], cheap[cal], frontier[cal], cats[cal], pooled, cert, holdout=0.0, seed=seed,
                             oracle=oracle, target_quality=args.target_quality, target_escalation=None,
                             delta=args.delta, min_rows=args.min_rows)
        thresholds = {"pooled": np.full(len(hold), pooled),
                      "per_category": np.array([per[c].threshold if c in per else pooled for c in cats[hold]])}
        for kind, thr in thresholds.items():
            keep = conf[hold] >= thr
            quality = np.where(keep, cheap[hold], frontier[hold])
            for scope in ["all", *names]:
                rows = np.ones(len(hold), bool) if scope == "all" else cats[hold] == scope
                if not rows.any():
                    continue
                d = acc[kind].setdefault(scope, [])
                d.append((float(1 - keep[rows].mean()), float(quality[rows].mean() / max(frontier[hold][rows].mean(),
                                                                                         1e-12))))
    summary = {kind: {scope: {"escalation_rate": float(np.mean([v[0] for v in vals])),
                              "quality_ratio": float(np.mean([v[1] for v in vals])),
                              "splits_below_target": int(sum(v[1] < args.target_quality for v in vals))}
                      for scope, vals in by.items()} for kind, by in acc.items()}
    counts = {c: int(np.sum(cats == c)) for c in names}
    if args.json:
        print(json.dumps({"run": str(args.run), "rows": len(conf), "categories": counts, "summary": summary,
                          "target_quality": args.target_quality, "delta": args.delta, "splits": args.splits}, indent=2))
        return
    print(f"run {args.run}: {len(conf)} rows {counts}; target {args.target_quality} x frontier, delta {args.delta}, "
          f"{args.splits} random halvings (held-out figures)\n")
    print("| scope | escalation, pooled | escalation, per-category | quality/frontier, pooled | "
          "quality/frontier, per-category | splits below target (pooled / per-cat) |")
    print("|---|---|---|---|---|---|")
    for scope in ["all", *names]:
        a, b = summary["pooled"].get(scope), summary["per_category"].get(scope)
        if a is None or b is None:
            continue
        print(f"| {scope} | {a['escalation_rate']:.1%} | {b['escalation_rate']:.1%} | {a['quality_ratio']:.3f} | "
              f"{b['quality_ratio']:.3f} | {a['splits_below_target']} / {b['splits_below_target']} |")


if __name__ == "__main__":
    main()
