"""How well a local tier's confidence separates right tool calls from wrong ones.

A small labelled set: each prompt with the tool and the arguments a right call has. The tier
answers each (greedy, the tools given, tool_choice required); a call is right when its name is the
expected one and every expected argument matches (strings compared case- and space-insensitively,
numbers by value; extra optional arguments are allowed). The report gives the accuracy and, per
confidence aggregator, the AUROC of the confidence for "right" (0.5 is chance) with its 95%
bootstrap interval (rows resampled; on a set this small the interval is wide).

    python -m localroute.evaluation.tool_calls [--model smollm2-135m] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import numpy as np

from localroute.evaluation.metrics import auroc, bootstrap_intervals
from localroute.routing.confidence import all_confidences
from localroute.types import GenerationRequest, SamplingParams

__all__ = ["LABELLED", "TOOLS", "is_right", "measure"]

TOOLS: tuple[dict[str, Any], ...] = (
    {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}},
    {"name": "get_time", "description": "Current local time in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "add", "description": "Add two numbers",
     "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                    "required": ["a", "b"]}},
    {"name": "convert_currency", "description": "Convert an amount of money between currencies",
     "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                                                     "from_currency": {"type": "string"},
                                                     "to_currency": {"type": "string"}},
                    "required": ["amount", "from_currency", "to_currency"]}},
    {"name": "send_email", "description": "Send an email",
     "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"}},
                    "required": ["to", "subject"]}},
)

# (prompt, expected tool, expected arguments)
LABELLED: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("What's the weather in Paris?", "get_weather", {"city": "Paris"}),
    ("Is it cold in Oslo today?", "get_weather", {"city": "Oslo"}),
    ("Weather in Tokyo in fahrenheit, please.", "get_weather", {"city": "Tokyo", "unit": "fahrenheit"}),
    ("How hot is it in Cairo, in celsius?", "get_weather", {"city": "Cairo", "unit": "celsius"}),
    ("What time is it in London?", "get_time", {"city": "London"}),
    ("Tell me the current time in Sydney.", "get_time", {"city": "Sydney"}),
    ("What's the local time in New York?", "get_time", {"city": "New York"}),
    ("What is 2 plus 3?", "add", {"a": 2, "b": 3}),
    ("Add 17 and 25.", "add", {"a": 17, "b": 25}),
    ("What is the sum of 1.5 and 2.25?", "add", {"a": 1.5, "b": 2.25}),
    ("Convert 100 USD to EUR.", "convert_currency", {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}),
    ("How many yen is 50 euros? (EUR to JPY)", "convert_currency",
     {"amount": 50, "from_currency": "EUR", "to_currency": "JPY"}),
    ("Change 20 GBP into USD.", "convert_currency", {"amount": 20, "from_currency": "GBP", "to_currency": "USD"}),
    ("Email bob@example.com with the subject 'Lunch'.", "send_email", {"to": "bob@example.com", "subject": "Lunch"}),
    ("Send an email to ann@example.org titled 'Report due'.", "send_email",
     {"to": "ann@example.org", "subject": "Report due"}),
    ("Is it sunny in Rome?", "get_weather", {"city": "Rome"}),
    ("What time is it in Berlin right now?", "get_time", {"city": "Berlin"}),
    ("What is 40 plus 2?", "add", {"a": 40, "b": 2}),
)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, str):
        return isinstance(got, str) and " ".join(got.lower().split()) == " ".join(want.lower().split())
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - want) < 1e-9
    return bool(got == want)


def is_right(name: str, arguments: dict[str, Any], want_name: str, want_args: dict[str, Any]) -> bool:
    return name == want_name and all(_same(arguments.get(k), v) for k, v in want_args.items())


async def _answers(backend: Any) -> list[dict[str, Any]]:
    rows = []
    for prompt, want_name, want_args in LABELLED:
        request = GenerationRequest(messages=({"role": "user", "content": prompt},), tools=TOOLS,
                                    params=SamplingParams(max_tokens=96, temperature=0, top_logprobs=5))
        gen = await backend.generate(request)
        call = (gen.raw or {}).get("choices", [{}])[0].get("message", {}).get("tool_calls") if gen.raw else None
        if call:
            name, arguments = call[0]["function"]["name"], json.loads(call[0]["function"]["arguments"])
        else:
            name, arguments = "", {}
        rows.append({"prompt": prompt, "call": {"name": name, "arguments": arguments},
                     "right": is_right(name, arguments, want_name, want_args),
                     "finish_reason": gen.finish_reason, "confidences": all_confidences(gen.tokens)})
    return rows


def measure(backend: Any) -> dict[str, Any]:
    """Answer the labelled set with `backend` (a local tier) and report accuracy and AUROCs."""
    rows = asyncio.run(_answers(backend))
    right = np.array([r["right"] for r in rows], dtype=bool)
    aurocs: dict[str, float | None] = {}
    intervals: dict[str, tuple[float, float] | None] = {}
    cheap, frontier = right.astype(np.float64), np.ones(len(rows))  # a frontier taken as always right
    for name in rows[0]["confidences"]:
        conf = np.array([r["confidences"][name] for r in rows])
        aurocs[name] = auroc(conf, right)
        intervals[name] = bootstrap_intervals(conf, cheap, frontier, right)["auroc"]  # few rows: say how few
    return {"n": len(rows), "right": int(right.sum()), "calls": sum(r["finish_reason"] == "tool_calls" for r in rows),
            "auroc": aurocs, "auroc_95ci": intervals, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    settings = Settings()
    engine = LlamaEngine(resolve_model_path(args.model, settings.models_dir), n_ctx_seq=1024, n_parallel=1,
                         n_threads=settings.n_threads)
    try:
        report = measure(LlamaCppBackend(args.model, engine))
    finally:
        engine.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.model}: {report['right']}/{report['n']} right calls ({report['calls']} parsed as calls)")
    for name, value in report["auroc"].items():
        ci = report["auroc_95ci"][name]
        print(f"  AUROC {name:18s} {'n/a' if value is None else f'{value:.3f}'}"
              f"{'' if ci is None else f'  95% CI [{ci[0]:.2f}, {ci[1]:.2f}]'}")
    for r in report["rows"]:
        print(f"  {'ok ' if r['right'] else 'BAD'} {r['confidences']['mean_logprob']:8.3f}  {r['prompt'][:40]:40s} "
              f"{json.dumps(r['call'])[:80]}")


if __name__ == "__main__":
    main()
