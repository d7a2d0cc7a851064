#!/usr/bin/env python3
"""What label confidence costs per request, sequential against batched scoring (issue 18):

    flock -x /tmp/cpu.lock python scripts/bench_labels.py --rows 20 [--set banking77 --set tweeteval-sentiment]

SmolLM2 through the llama.cpp engine with the settings' defaults (n_ctx, n_parallel, threads), one
request at a time. Each row of a staged choice set (../shared/data, or LOCALROUTE_EVAL_DATA_DIR)
is answered twice, the label scoring sequential (one llama_decode per LabelPlan feed in the
slot's stream: the method before batching) and batched (backends/label_scoring.py), in
alternating order. Per set and method it prints the scoring's own time per request
(Generation.extra["label"]["cost_s"]: median, p90), the tokens fed and llama_decode calls per
request, and the largest difference between the two methods' raw label logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _items(name: str, rows: int, seed: int) -> list[Any]:
    from localroute.evaluation.datasets import convert

    near = [p / "shared" / "data" for p in (ROOT.parent, ROOT.parent.parent)]  # a checkout, or a worktree of one
    data = Path(os.environ.get("LOCALROUTE_EVAL_DATA_DIR") or next((p for p in near if p.is_dir()), near[0]))
    return convert(name, data, limit=rows, seed=seed)


def _request(item: Any) -> Any:
    from localroute.evaluation.runner import EvalConfig, _request

    return _request(EvalConfig(dataset=Path("-"), out_dir=Path("-")), item)


def _q(values: list[float], q: float) -> float | None:
    return float(sorted(values)[min(len(values) - 1, int(q * len(values)))]) if values else None


async def bench(names: list[str], rows: int, seed: int) -> dict[str, Any]:
    from localroute.backends.base import load_backend
    from localroute.settings import Settings

    settings = Settings()
    backend: Any = load_backend(settings.ladder()[0], settings)
    scorer = backend.engine._labels
    out: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "n_ctx": settings.n_ctx, "n_parallel": settings.n_parallel,
                           "n_threads": settings.n_threads, "sets": {}}
    try:
        for name in names:
            items = _items(name, rows, seed)
            scorer.batched = True
            await backend.generate(_request(items[0]))  # warm-up: builds the scoring context
            got: dict[str, list[dict[str, Any]]] = {"sequential": [], "batched": []}
            diff = 0.0
            for i, item in enumerate(items):
                infos = {}
                for mode in (("sequential", "batched") if i % 2 else ("batched", "sequential")):
                    scorer.batched = mode == "batched"
                    gen = await backend.generate(_request(item))
                    info = gen.extra.get("label") or {}
                    if "raw" in info:
                        infos[mode] = info
                        got[mode].append(info)
                if len(infos) == 2:
                    a, b = infos["sequential"]["raw"], infos["batched"]["raw"]
                    diff = max([diff, *(abs(a[k] - b[k]) for k in a)])
            summary: dict[str, Any] = {"rows": len(items), "labels": len(items[0].choices or ()),
                                       "max_raw_logprob_diff": diff}
            for mode, infos_ in got.items():
                ms = [1000 * x["cost_s"] for x in infos_]
                summary[mode] = {"scored": len(infos_), "median_ms": _q(ms, .5), "p90_ms": _q(ms, .9),
                                 "mean_ms": statistics.mean(ms) if ms else None,
                                 "tokens_fed_median": _q([x["tokens_fed"] for x in infos_], .5),
                                 "decode_calls_median": _q([x["decode_calls"] for x in infos_], .5),
                                 "methods": sorted({x["method"] + (" (" + x["fallback"] + ")" if "fallback" in x else "")
                                                    for x in infos_})}
            out["sets"][name] = summary
    finally:
        await backend.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", dest="sets", help="staged set (default: tweeteval-sentiment, banking77)")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(bench(args.sets or ["tweeteval-sentiment", "banking77"], args.rows, args.seed)), indent=2))


if __name__ == "__main__":
    main()
