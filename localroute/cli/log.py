"""`localroute log migrate`: copy a SQLite routing log into PostgreSQL (monitoring/log_migrate.py)."""

from __future__ import annotations

import argparse
import sys

from localroute.cli.common import add_config_flag, print_json, settings_from
from localroute.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("log", help="the routing log's database")
    lsub = p.add_subparsers(dest="log_command", required=True)
    m = lsub.add_parser("migrate", help="copy a SQLite routing log into PostgreSQL (idempotent: a rerun copies "
                        "nothing twice)")
    add_config_flag(m)
    m.add_argument("--from", dest="source", default=None, metavar="PATH_OR_URL",
                   help="the SQLite routing log (a path or sqlite:///path; default: routing_log_path)")
    m.add_argument("--to", dest="target", default=None, metavar="URL",
                   help="the PostgreSQL log, postgresql://... (default: routing_log_url)")
    m.add_argument("--dry-run", action="store_true", help="count what would be copied; write nothing")
    m.add_argument("--batch-size", type=int, default=1000, help="rows per read and per transaction")
    m.add_argument("--json", action="store_true", help="print the counts as JSON")
    m.set_defaults(func=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    from localroute.monitoring.log_migrate import migrate_log

    settings = settings_from(args)
    source = args.source or settings.routing_log_path
    target = args.target or settings.routing_log_url
    if source is None:
        raise ConfigError("no source: pass --from or set routing_log_path", param="from")
    if target is None:
        raise ConfigError("no target: pass --to postgresql://... or set routing_log_url", param="to")
    tty = sys.stderr.isatty()

    def progress(table: str, done: int, total: int) -> None:
        sys.stderr.write(f"\r{table:<14} {done}/{total}" + ("\n" if done >= total else ""))
        sys.stderr.flush()

    result = migrate_log(source, target, dry_run=args.dry_run, batch_size=args.batch_size,
                         progress=progress if tty else None)
    if args.json:
        print_json(result.as_dict())
        return 0
    verb = "would copy" if result.dry_run else "copied"
    print(f"{result.source} -> {result.target}" + (" (dry run: nothing written)" if result.dry_run else ""))
    if result.applied:
        print(f"target was empty: {len(result.applied)} migrations applied")
    print(f"{'table':<14}{'in source':>11}{verb:>12}{'already there':>15}")
    for name, c in result.tables.items():
        print(f"{name:<14}{c.source:>11}{c.copied:>12}{c.present:>15}")
    return 0
