"""`localroute data`: convert the staged public data sets to the generic evaluation JSONL."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from localroute.evaluation.datasets import ADAPTERS

    p = sub.add_parser("data", help="evaluation data sets")
    inner = p.add_subparsers(dest="data_command", required=True)
    c = inner.add_parser("convert", help="convert a staged data set to evaluation JSONL")
    add_config_flag(c)
    c.add_argument("name", choices=sorted(ADAPTERS))
    c.add_argument("--limit", type=int, default=None, help="a seeded random sample of N rows")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    c.add_argument("--data-dir", type=Path, default=None, help="staged data folder (default: settings.eval_data_dir)")
    c.set_defaults(func=run_convert)
    ls = inner.add_parser("list", help="list the adapters")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)


def run_convert(args: argparse.Namespace) -> int:
    from localroute.evaluation.datasets import convert, write_items

    settings = settings_from(args)
    items = convert(args.name, args.data_dir or settings.eval_data_dir, args.limit, args.seed)
    if args.out is None:
        for item in items:
            sys.stdout.write(item.to_json() + "\n")
        return 0
    n = write_items(items, args.out)
    print(f"wrote {n} items to {args.out}", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from localroute.evaluation.datasets import ADAPTERS

    names = sorted(ADAPTERS)
    if args.json:
        print_json(names)
    else:
        print("\n".join(names))
    return 0
