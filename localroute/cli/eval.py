"""`localroute eval`: run a tier over a dataset (resumable) and report every confidence signal."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="evaluate a tier on a dataset: quality, AUROC, deferral curves, APGR, CPT")
    add_config_flag(p)
    p.add_argument("--dataset", type=Path, default=None, help="evaluation JSONL (see `localroute data convert`)")
    p.add_argument("--run", type=Path, default=None, help="only re-report an existing run folder")
    p.add_argument("--tier", default=None, help="tier name (default: the first, cheapest)")
    p.add_argument("--limit", type=int, default=None, help="a seeded random sample of N items")
    p.add_argument("--seed", type=int, default=0, help="sample and decoding seed")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (the engine batches them)")
    p.add_argument("--frontier", default="oracle",
                   help="live | recorded:<model> | oracle (frontier assumed right: an upper bound)")
    p.add_argument("--max-tokens", type=int, default=None, help="override the per-task answer length")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL of the judge (judge tasks)")
    p.add_argument("--judge-model", default=None, help="judge model id")
    p.add_argument("--verifier", default=None,
                   help="tier asked whether each answer is correct; its P(Yes) is compared as one more signal")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<dataset>-<tier>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from localroute.errors import ConfigError
    from localroute.evaluation.report import render_table, write_report
    from localroute.evaluation.runner import EvalConfig, pick_tier, run_eval

    if args.run is not None:
        out = args.run
    else:
        if args.dataset is None:
            raise ConfigError("give --dataset FILE (or --run DIR to re-report)", param="dataset")
        settings = settings_from(args)
        tier = pick_tier(settings, args.tier)
        out = args.out or Path("runs") / f"{args.dataset.stem}-{tier.name}"
        cfg = EvalConfig(
            dataset=args.dataset, out_dir=out, tier=args.tier, limit=args.limit, seed=args.seed,
            concurrency=args.concurrency, frontier=args.frontier, max_tokens=args.max_tokens,
            judge_url=args.judge_url, judge_model=args.judge_model,
            judge_api_key=os.environ.get("LOCALROUTE_JUDGE_API_KEY"), verifier=args.verifier,
            progress=sys.stderr.isatty(),
        )
        summary = asyncio.run(run_eval(settings, cfg))
        print(f"{summary.computed} computed, {summary.skipped} already done, {summary.errors} with errors -> {out}",
              file=sys.stderr)
    report = write_report(out, plots=not args.no_plots)
    if args.json:
        print_json(report)
    else:
        print(render_table(report))
    return 0
