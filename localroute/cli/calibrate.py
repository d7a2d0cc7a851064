"""`localroute calibrate`: pick a tier's threshold from an eval run and write the calibration file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from
from localroute.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("calibrate", help="choose a threshold with a finite-sample guarantee from an eval run")
    add_config_flag(p)
    p.add_argument("--run", type=Path, default=None, help="eval run folder")
    p.add_argument("--from-log", nargs="?", const=True, default=None, metavar="LOG",
                   help="refit the per-category thresholds from the routing log's shadow pairs and feedback "
                   "(a SQLite file or a postgresql:// URL; default: routing_log_url or routing_log_path) "
                   "instead of an eval run; needs --target-quality")
    p.add_argument("--since", default=None, help="--from-log: only the log since then (24h, 7d, ISO 8601)")
    p.add_argument("--per-category", action="store_true",
                   help="also fit one threshold per task category of the run's rows (item meta.localroute_category, "
                   "else the item id's prefix), delta split across the categories")
    p.add_argument("--min-category-rows", type=int, default=30,
                   help="a category with fewer rows keeps the pooled threshold (said so in the file)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-quality", type=float, help="cascade quality >= this share of the frontier's")
    target.add_argument("--target-escalation", type=float, help="escalate this share of queries (a quantile)")
    p.add_argument("--delta", type=float, default=0.05, help="the target may fail with probability <= delta")
    p.add_argument("--aggregator", default=None, help="confidence aggregator (default: settings)")
    p.add_argument("--router", action="store_true",
                   help="calibrate the pre-inference routers' threshold (router_threshold) instead: the routers "
                   "named by router_embedding_path / router_classifier_path score the run's queries")
    p.add_argument("--holdout", type=float, default=0.5, help="share of rows kept aside to check the threshold")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--out", type=Path, default=None,
                   help="calibration file (default: settings.calibration_path or ./calibration.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localroute.evaluation.thresholds import calibrate_run

    settings = settings_from(args)
    out = args.out or settings.calibration_path or Path("calibration.json")
    if args.from_log is not None:
        return _from_log(args, settings, out)
    if args.run is None:
        raise ConfigError("give --run (an eval run folder) or --from-log", param="run")
    if args.router:
        return _router(args, settings, out)
    result = calibrate_run(
        args.run, out, args.aggregator or settings.confidence_aggregator,
        target_quality=args.target_quality, target_escalation=args.target_escalation,
        delta=args.delta, holdout=args.holdout, seed=args.seed,
        per_category=args.per_category, min_category_rows=args.min_category_rows,
        tier_fields={ts.name: tuple(ts.confidence_fields) for ts in settings.ladder() if ts.confidence_fields},
    )
    if args.json:
        print_json(result)
        return 0
    cert = result["certificate"]
    ub = "  [oracle frontier: upper bound]" if result["upper_bound"] else ""
    thr = "escalate everything" if result["escalate_all"] else f"{result['threshold']:.6f}"
    print(f"tier {result['tier']}  aggregator {result['aggregator']}  threshold {thr}{ub}")
    if cert["target"] == "quality":
        print(f"certified ({cert['bound']}, delta={cert['delta']}): cascade quality >= {cert['target_value']:.3f} x "
              f"frontier with probability >= {1 - cert['delta']:.3f}; quality lower bound "
              f"{cert['certified_quality_lower']:.4f} (n={cert['n_calibration']})")
    else:
        print(f"target escalation {cert['target_value']:.3f} (a quantile; no guarantee), n={cert['n_calibration']}")
    h = cert.get("holdout") or {}
    if h:
        print(f"held-out (n={h['n']}): cascade quality {h['cascade_quality']:.4f} = {h['quality_ratio']:.3f} x frontier "
              f"{h['frontier_quality']:.4f}; escalation rate {h['escalation_rate']:.3f}")
    _print_categories(result.get("categories") or {})
    print(f"wrote {result['calibration_file']}")
    return 0


def _print_categories(categories: dict[str, Any]) -> None:
    for name, c in categories.items():
        thr = "escalate everything" if c["threshold"] >= 1e9 else f"{c['threshold']:.6f}"
        cert = c["certificate"]
        if c.get("fallback"):
            print(f"  category {name:<16} threshold {thr}  POOLED ({c['fallback']})")
        elif cert["target"] == "quality":
            print(f"  category {name:<16} threshold {thr}  certified at delta={cert['delta']:.4g}, quality lower "
                  f"bound {cert['certified_quality_lower']:.4f} (n={cert['n_calibration']})")
        else:
            print(f"  category {name:<16} threshold {thr}  (escalation quantile, n={cert['n_calibration']})")


def _from_log(args: argparse.Namespace, settings: Any, out: Path) -> int:
    from localroute.cli.report import parse_time
    from localroute.evaluation.from_log import calibrate_from_log

    if args.target_quality is None:
        raise ConfigError("--from-log certifies a quality target: give --target-quality", param="target_quality")
    from localroute.monitoring.postgres_log import is_postgres_url

    log = settings.routing_log_target() if args.from_log is True else args.from_log
    if log is None:
        raise ConfigError("--from-log: no routing log; pass its path or postgresql:// URL, or set routing_log_path "
                          "or routing_log_url", param="routing_log_path")
    log = log if is_postgres_url(log) else Path(log)
    result = calibrate_from_log(log, out, settings, args.target_quality, args.delta, args.min_category_rows,
                                since=parse_time(args.since) if args.since else None, seed=args.seed)
    if args.json:
        print_json(result)
        return 0
    print(f"recalibrated from {result['log']}: target quality {result['target_quality']} (agreement with the "
          f"frontier), delta {result['delta']} split over {result['certified']} (tier, category) pairs")
    for tier, cats in result["tiers"].items():
        print(f"tier {tier}")
        _print_categories(cats)
    print(f"wrote {result['calibration_file']}; a running `serve` applies it without a restart")
    return 0


def _router(args: argparse.Namespace, settings: Any, out: Path) -> int:
    from localroute.evaluation.thresholds import calibrate_router

    result = calibrate_router(args.run, out, settings, target_quality=args.target_quality,
                              target_escalation=args.target_escalation, delta=args.delta,
                              holdout=args.holdout, seed=args.seed)
    if args.json:
        print_json(result)
        return 0
    cert = result["certificate"]
    thr = "send everything to the cascade's top" if result["escalate_all"] else f"{result['threshold']:.6f}"
    print(f"routers {', '.join(result['routers'])}  router_threshold {thr}  "
          f"(novel to every router: {result['n_novel']} of {cert['n_calibration']})")
    if cert["target"] == "quality":
        print(f"certified ({cert['bound']}, delta={cert['delta']}): routed quality >= {cert['target_value']:.3f} x "
              f"frontier with probability >= {1 - cert['delta']:.3f}; quality lower bound "
              f"{cert['certified_quality_lower']:.4f}")
    h = cert.get("holdout") or {}
    if h:
        print(f"held-out (n={h['n']}): routed quality {h['cascade_quality']:.4f} = {h['quality_ratio']:.3f} x "
              f"frontier; sent past the cheap tier {h['escalation_rate']:.3f}")
    print(f"wrote {result['calibration_file']}")
    return 0
