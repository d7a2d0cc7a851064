"""`localroute config show`: the settings in effect after file, env and flags, secrets masked."""

from __future__ import annotations

import argparse

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective settings as JSON")
    add_config_flag(show)
    show.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print_json(settings_from(args).public_dict())
    return 0
