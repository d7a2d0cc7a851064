#!/usr/bin/env python3
"""What the issue-18 signals cost and save, on real rows of a staged set, SmolLM2 through llama.cpp:

    python scripts/bench_signals.py labels --set tweeteval-sentiment --rows 20
    python scripts/bench_signals.py early-exit --set gsm8k --rows 20 [--aggregator mean_logprob]

`labels`: each row is answered twice, one request at a time, with and without its labels; prints
the engine latency of both (mean, p50) and the label scoring's own time (Generation.extra["label"]
["cost_s"]) per request.

`early-exit`: the cascade (SmolLM2 -> an OpenAI-compatible frontier stand-in on 127.0.0.1 that
answers at once) over the rows, with the threshold set to the median confidence of the rows' full
answers (so about half escalate), once with early escalation off and once on. Checks that every
decision is the same, and prints the local decode time spent on escalated requests (sum, mean) and
the end-to-end latency of escalated answers (mean, p50, p95) for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _items(name: str, rows: int, seed: int) -> list[Any]:
    from localroute.evaluation.datasets import convert

    data = Path(os.environ.get("LOCALROUTE_EVAL_DATA_DIR", ROOT.parent / "shared" / "data"))
    return convert(name, data, limit=rows, seed=seed)


def _request(item: Any, with_labels: bool = True) -> Any:
    from dataclasses import replace

    from localroute.evaluation.runner import EvalConfig, _request

    req = _request(EvalConfig(dataset=Path("-"), out_dir=Path("-")), item)
    return req if with_labels else replace(req, labels=())


def _q(values: list[float], q: float) -> float:
    return float(sorted(values)[min(len(values) - 1, int(q * len(values)))]) if values else float("nan")


async def bench_labels(items: list[Any]) -> dict[str, Any]:
    from localroute.backends.base import load_backend
    from localroute.settings import Settings

    settings = Settings()
    backend = load_backend(settings.ladder()[0], settings)
    with_l, without, cost = [], [], []
    try:
        await backend.generate(_request(items[0]))  # warm-up
        for item in items:
            a = await backend.generate(_request(item, with_labels=False))
            b = await backend.generate(_request(item))
            without.append(a.latency_s)
            with_l.append(b.latency_s)
            if isinstance(b.extra.get("label"), dict) and "cost_s" in b.extra["label"]:
                cost.append(float(b.extra["label"]["cost_s"]))
    finally:
        await backend.aclose()
    return {"rows": len(items), "latency_without_labels_s": {"mean": statistics.mean(without), "p50": _q(without, .5)},
            "latency_with_labels_s": {"mean": statistics.mean(with_l), "p50": _q(with_l, .5)},
            "label_scoring_s": {"mean": statistics.mean(cost) if cost else None, "p50": _q(cost, .5),
                                "p95": _q(cost, .95), "n": len(cost)},
            "labels_per_row": len(items[0].choices or ())}


def _frontier_standin() -> tuple[str, Any]:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        return {"id": "f", "object": "chat.completion", "created": 0, "model": "standin",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


async def bench_early_exit(items: list[Any], aggregator: str) -> dict[str, Any]:
    from localroute.backends.base import load_backend
    from localroute.routing.base import Tier
    from localroute.routing.cascade import CascadeRouter
    from localroute.routing.confidence import answer_confidence
    from localroute.settings import Settings, TierSettings

    url, server = _frontier_standin()
    settings = Settings()
    local = load_backend(settings.ladder()[0], settings)
    frontier = load_backend(TierSettings(name="frontier", kind="openai", model="standin", base_url=url), settings)
    try:
        confs = []
        for item in items:  # the full answers: their median confidence is the threshold
            gen = await local.generate(_request(item))
            conf = answer_confidence(aggregator, gen.tokens, settings.confidence_quantile_alpha, gen.text, gen.extra)
            confs.append(float("-inf") if conf is None else conf)
        threshold = float(statistics.median(confs))
        out: dict[str, Any] = {"rows": len(items), "aggregator": aggregator, "threshold": threshold}
        decisions = {}
        for mode in ("off", "on"):
            router = CascadeRouter([Tier("local", local, threshold), Tier("frontier", frontier, None)], aggregator,
                                   settings.confidence_quantile_alpha, early_escalation=mode == "on")
            local_s, e2e, tokens, dec = [], [], [], []
            for item in items:
                t0 = time.perf_counter()
                routed = await router.route(_request(item))
                total = time.perf_counter() - t0
                d = routed.decision
                dec.append(d.answered_by)
                if d.escalated:
                    local_s.append(d.attempts[0].latency_s)
                    tokens.append(d.attempts[0].completion_tokens)
                    e2e.append(total)
            decisions[mode] = dec
            out[mode] = {"escalated": len(e2e), "local_decode_s_on_escalated": {"sum": sum(local_s),
                         "mean": statistics.mean(local_s) if local_s else None},
                         "local_tokens_on_escalated_mean": statistics.mean(tokens) if tokens else None,
                         "e2e_escalated_s": {"mean": statistics.mean(e2e) if e2e else None, "p50": _q(e2e, .5),
                                             "p95": _q(e2e, .95)}}
        out["same_decisions"] = decisions["off"] == decisions["on"]
        return out
    finally:
        await local.aclose()
        await frontier.aclose()
        server.should_exit = True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("labels", "early-exit"))
    p.add_argument("--set", default="tweeteval-sentiment")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aggregator", default="mean_logprob")
    args = p.parse_args()
    items = _items(args.set, args.rows, args.seed)
    if args.what == "labels":
        result = asyncio.run(bench_labels([it for it in items if it.task == "choice"]))
    else:
        result = asyncio.run(bench_early_exit(items, args.aggregator))
    print(json.dumps({"set": args.set, **result}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
