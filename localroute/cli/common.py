"""Flags and helpers shared by commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from localroute.settings import Settings, load_settings


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(getattr(args, "config", None), **overrides)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
