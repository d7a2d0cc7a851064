"""The thin CLI: each command module parses its flags, calls one library function and prints.

A command module exposes `register(subparsers)`, which adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from localroute import __version__
from localroute.errors import LocalrouteError

# One module per command group, imported only when the CLI starts.
COMMANDS: tuple[str, ...] = (
    "localroute.cli.serve",
    "localroute.cli.ask",
    "localroute.cli.models",
    "localroute.cli.config",
    "localroute.cli.report",
    "localroute.cli.log",
    "localroute.cli.doctor",
    "localroute.cli.data",
    "localroute.cli.eval",
    "localroute.cli.calibrate",
    "localroute.cli.train",
    "localroute.cli.routers",
    "localroute.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localroute", description="Local-inference router.")
    parser.add_argument("--version", action="version", version=f"localroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except LocalrouteError as exc:
        print(f"localroute: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)
