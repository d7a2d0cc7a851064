#!/usr/bin/env python3
"""How often the cascade's repetition check (localroute/routing/repetition.py) fires on the answers
of `localroute eval` runs, and on what: a check that fires on normal answers escalates good ones.

    python scripts/repetition_rate.py runs/eval/*/ [--min-repeats 4] [--min-coverage 0.3] [--json]

Prints per run: rows, answers the check rejects (share), how many of those the scorer had marked
correct, and each hit's repeated phrase.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rate(run_dir: Path, min_repeats: int, min_coverage: float) -> dict[str, Any]:
    from localroute.evaluation.runs import read_rows
    from localroute.routing.repetition import find_repetition

    rows = read_rows(run_dir)
    hits = []
    for row in rows:
        found = find_repetition(row.get("output") or "", min_repeats, min_coverage)
        if found is not None:
            hits.append({"id": row["id"], "correct": bool((row.get("cheap") or {}).get("correct")),
                         "finish_reason": row.get("finish_reason"), **found.as_evidence()})
    return {"run": str(run_dir), "rows": len(rows), "fired": len(hits),
            "share": len(hits) / len(rows) if rows else 0.0,
            "fired_on_correct": sum(h["correct"] for h in hits), "hits": hits}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--min-repeats", type=int, default=4)
    p.add_argument("--min-coverage", type=float, default=0.3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = [rate(r, args.min_repeats, args.min_coverage) for r in args.runs if (r / "rows.jsonl").is_file()]
    total = sum(r["rows"] for r in results)
    fired = sum(r["fired"] for r in results)
    if args.json:
        print(json.dumps({"min_repeats": args.min_repeats, "min_coverage": args.min_coverage, "rows": total,
                          "fired": fired, "runs": results}, indent=2))
        return 0
    for r in results:
        print(f"{r['run']:48s} {r['rows']:5d} rows  fired {r['fired']:4d} ({r['share']:.1%}), "
              f"{r['fired_on_correct']} of them scored correct")
        for h in r["hits"]:
            print(f"    {h['id']}: {h['ngram']!r} x{h['repeats']} covering {h['coverage']:.0%} "
                  f"({h['finish_reason']}, {'correct' if h['correct'] else 'wrong'})")
    print(f"total: {fired} of {total} answers ({fired / total if total else 0:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
