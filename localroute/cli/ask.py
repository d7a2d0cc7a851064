"""`localroute ask "prompt"`: one answer through the router, with its routing decision."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from localroute.cli.common import add_config_flag, print_json, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ask", help="answer one prompt and show how it was routed")
    add_config_flag(p)
    p.add_argument("prompt")
    p.add_argument("--model", default="localroute/cascade", help="policy or tier name")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


async def ask(settings: Any, prompt: str, model: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    from localroute.service import Service, build_tiers
    from localroute.types import GenerationRequest, SamplingParams

    service = Service(settings, build_tiers(settings))
    try:
        request = GenerationRequest(
            messages=({"role": "user", "content": prompt},),
            params=SamplingParams(max_tokens=max_tokens, temperature=temperature),
        )
        routed = await service.router(model).route(request)
    finally:
        await service.aclose()
    return {"answer": routed.generation.text, "routing": routed.decision.as_dict()}


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    result = asyncio.run(ask(settings, args.prompt, args.model, args.max_tokens, args.temperature))
    if args.json:
        print_json(result)
        return 0
    r = result["routing"]
    print(result["answer"])
    print()
    conf = "n/a" if r["confidence"] is None else f"{r['confidence']:.3f}"
    print(f"tier={r['tier']} confidence={conf} escalated={r['escalated']} signal={r['signal']}")
    for a in r["attempts"]:
        c = "n/a" if a["confidence"] is None else f"{a['confidence']:.3f}"
        print(f"  {a['tier']}: confidence={c} threshold={a['threshold']} accepted={a['accepted']} "
              f"latency={a['latency_s']:.3f}s" + (f" error={a['error']}" if a["error"] else ""))
    return 0
