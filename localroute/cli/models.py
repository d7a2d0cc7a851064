"""`localroute models`: the ladder's tiers, their files and whether each is present."""

from __future__ import annotations

import argparse
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from
from localroute.errors import LocalrouteError
from localroute.registry import resolve_model_path
from localroute.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("models", help="list tiers and whether their model files are present")
    add_config_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def describe(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for tier in settings.ladder():
        row: dict[str, Any] = {"tier": tier.name, "kind": tier.kind, "model": tier.model}
        if tier.kind in ("llama_cpp", "transformers"):
            try:
                row.update(path=str(resolve_model_path(tier.model, settings.models_dir)), present=True)
            except LocalrouteError as exc:
                row.update(path=None, present=False, problem=exc.message)
        else:
            row.update(path=tier.base_url, present=None)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    rows = describe(settings_from(args))
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        state = {True: "present", False: "MISSING", None: "remote"}[r["present"]]
        print(f"{r['tier']:<16} {r['kind']:<12} {state:<8} {r['path'] or r.get('problem', '')}")
    return 0 if all(r["present"] is not False for r in rows) else 1
