"""`localroute routers ...`: inspect trained router artefacts, list the review sample, and evaluate
our routers against RouteLLM on RouteLLM's own data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("routers", help="router artefacts, review sample, RouteLLM comparison")
    rsub = p.add_subparsers(dest="routers_command", required=True)

    show = rsub.add_parser("show", help="print a router artefact's training metadata (validates it)")
    show.add_argument("path", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    review = rsub.add_parser("review", help="requests sampled for human review (review_sample_rate)")
    add_config_flag(review)
    review.add_argument("--all", action="store_true", help="include reviewed ones")
    review.add_argument("--limit", type=int, default=50)
    review.add_argument("--json", action="store_true")
    review.set_defaults(func=run_review)

    ev = rsub.add_parser("eval-routellm", help="our routers vs RouteLLM on its recorded Mixtral/GPT-4 outcomes")
    ev.add_argument("--out", type=Path, default=Path("runs/routellm_eval"), help="report folder (md, json, png)")
    ev.add_argument("--encoders", default="minilm,smollm2", help="comma list of encoders to compare")
    ev.add_argument("--kinds", default="classifier,embedding")
    ev.add_argument("--data-dir", type=Path, default=None)
    ev.add_argument("--bootstrap", type=int, default=200)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--limit", type=int, default=None, help="rows per dataset (quick runs)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=run_eval)


def run_show(args: argparse.Namespace) -> int:
    from localroute.routing.artifacts import load_artifact

    art = load_artifact(args.path)
    info: dict[str, Any] = {"kind": art.kind, "encoder": art.encoder, "tiers": art.tiers, "dim": art.dim,
                            "params": art.params, "training": art.training,
                            "arrays": {k: list(v.shape) for k, v in art.arrays.items()}}
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def run_review(args: argparse.Namespace) -> int:
    from localroute.errors import ConfigError
    from localroute.monitoring.feedback import FeedbackStore

    settings = settings_from(args)
    if settings.routing_log_path is None or not Path(settings.routing_log_path).is_file():
        raise ConfigError("no routing log: set routing_log_path", param="routing_log_path")
    rows = FeedbackStore(settings.routing_log_path).review_queue(not args.all, args.limit)
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            print(f"{r['request_id']}  policy={r['policy']} tier={r['tier']} feedback={r['feedback']}")
        print(f"{len(rows)} request(s)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from functools import partial

    from localroute.embeddings import load_encoder
    from localroute.evaluation.routellm import run_experiments, write_report

    buffers = settings_from(args).llama_extra_buffers
    encoders: dict[str, Any] = {name: partial(load_encoder, name, buffers) for name in args.encoders.split(",") if name}
    report = run_experiments(encoders, tuple(k for k in args.kinds.split(",") if k), args.data_dir, args.seed,
                             args.bootstrap, progress=True, limit=args.limit)
    paths = write_report(report, args.out)
    if args.json:
        print_json({"paths": {k: str(v) for k, v in paths.items()}, "report": report})
    else:
        print(paths["markdown"].read_text(encoding="utf-8"))
        print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0
