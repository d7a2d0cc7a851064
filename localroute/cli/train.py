"""`localroute train`: fit a classifier router or build an embedding router index from labelled
queries (an eval run, the routing log with feedback, or RouteLLM's recorded outcomes)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train a pre-inference router (classifier or embedding index)")
    add_config_flag(p)
    p.add_argument("--kind", choices=("classifier", "embedding"), default="classifier")
    p.add_argument("--encoder", default="minilm-int8",
                   help="minilm-int8 (default: all-MiniLM-L6-v2 computed in int8), minilm, smollm2, or gguf:<path>")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-eval", type=Path, metavar="RUN_DIR", help="an eval run folder (rows.jsonl + meta.json)")
    src.add_argument("--from-log", nargs="?", const="", metavar="DB",
                     help="the routing log with feedback: a SQLite file or a postgresql:// URL (default: "
                     "routing_log_url or routing_log_path)")
    src.add_argument("--from-routellm", metavar="DATASETS", help="comma list of mmlu, gsm8k, mt_bench")
    p.add_argument("--data-dir", type=Path, default=None, help="folder holding routellm/ (default ../shared/data)")
    p.add_argument("--tiers", default=None, help="--from-log: tier names cheapest first (default: the ladder)")
    p.add_argument("--out", type=Path, required=True, help="artefact path (.npz), written atomically")
    p.add_argument("--k", type=int, default=50, help="embedding: neighbours per decision")
    p.add_argument("--novelty", type=float, default=0.35, help="embedding: min cosine to the nearest neighbour")
    p.add_argument("--C", type=float, default=0.01, help="classifier: inverse L2 regularisation strength")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from localroute.embeddings import load_encoder
    from localroute.errors import ConfigError
    from localroute.evaluation.runs import from_eval_run
    from localroute.monitoring.log_report import from_routing_log
    from localroute.routing.artifacts import save_artifact
    from localroute.routing.training import LabelledQueries, train_router

    settings = settings_from(args)
    if args.from_eval is not None:
        data = from_eval_run(args.from_eval)
    elif args.from_log is not None:
        from localroute.monitoring.postgres_log import is_postgres_url

        db: Path | str | None = args.from_log or settings.routing_log_target()
        if db is not None and not is_postgres_url(db):
            db = Path(db)
        if db is None:
            raise ConfigError("--from-log needs a path or routing_log_path", param="from_log")
        tiers = args.tiers.split(",") if args.tiers else [t.name for t in settings.ladder()]
        data = from_routing_log(db, tiers)
    else:
        from localroute.evaluation.routellm import TIERS, load_routellm

        parts = [load_routellm(n.strip(), args.data_dir) for n in args.from_routellm.split(",") if n.strip()]
        data = LabelledQueries([t for d in parts for t in d.texts], list(TIERS),
                               np.concatenate([d.labels for d in parts]), f"routellm:{args.from_routellm}",
                               sum(d.skipped for d in parts))
    params: dict[str, Any] = ({"c": args.C} if args.kind == "classifier"
                              else {"k": args.k, "novelty_similarity": args.novelty})
    art = train_router(args.kind, data, load_encoder(args.encoder, settings.llama_extra_buffers), progress=True, **params)
    path = save_artifact(art, args.out)
    names = [str(c) for c in art.arrays.get("categories", []) if str(c)]
    return {"path": str(path), "kind": art.kind, "encoder": art.encoder, "tiers": art.tiers,
            "rows": len(data.texts), "skipped": data.skipped, "source": data.source, "params": art.params,
            "categories": {c: names.count(c) for c in sorted(set(names))}}  # the category index's rows


def run(args: argparse.Namespace) -> int:
    result = train(args)
    if args.json:
        print_json(result)
    else:
        print(f"{result['kind']} router ({result['encoder']}) trained on {result['rows']} rows from "
              f"{result['source']} ({result['skipped']} skipped); tiers {', '.join(result['tiers'])}")
        cats = result["categories"]
        print("category index: " + (", ".join(f"{c} {n}" for c, n in cats.items()) if cats else
                                     "none (no row carries a given category)"))
        print(f"saved {result['path']}")
    return 0
