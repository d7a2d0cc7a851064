#!/usr/bin/env python3
"""Rewrite an eval set's chat rows as a base-model prompt: "Q: ... A:" with few-shot pairs and stops.

A base model (gemma-3-270m, no chat template) continues a role-prefixed chat ("user: ...
assistant:") with more dialogue instead of answering. This is the format that gives it its best
chance and that a server could apply to any request, so nothing in it is specific to a data set:
the system message first, then the row's own example turns as Q/A pairs or, when it has none, two
fixed generic pairs, then "Q: <question>\\nA:". Generation stops at a new "Q:" or a blank line (and
at the row's own stops: one line for choice tasks).

    python scripts/qa_format.py runs/data/mmlu.jsonl runs/data/mmlu-qa.jsonl

Rows keep their ids and order, so `localroute eval --limit N --seed S` picks the same rows as on
the chat file (README, "The default ladder").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GENERIC_SHOTS = (("What is the capital of Italy?", "Rome"), ("How many legs does a spider have?", "8"))
STOPS = ["\nQ:", "\n\n"]


def qa_prompt(messages: list[dict[str, Any]]) -> str:
    system = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    shots: list[tuple[str, str]] = []
    for q, a in zip(turns[:-1:2], turns[1:-1:2], strict=False):
        if q.get("role") == "user" and a.get("role") == "assistant":
            shots.append((str(q.get("content") or ""), str(a.get("content") or "")))
    question = str(turns[-1].get("content") or "") if turns else ""
    parts = ["\n\n".join(system)] if system else []
    parts += [f"Q: {q}\nA: {a}" for q, a in (shots or GENERIC_SHOTS)]
    parts.append(f"Q: {question}\nA:")
    return "\n\n".join(parts)


def convert_row(row: dict[str, Any]) -> dict[str, Any]:
    if "messages" not in row:
        return row
    out = {k: v for k, v in row.items() if k != "messages"}
    out["prompt"] = qa_prompt(row["messages"])
    out["stop"] = list(dict.fromkeys([*(row.get("stop") or []), *STOPS]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args()
    n = 0
    with args.src.open(encoding="utf-8") as fin, args.dst.open("w", encoding="utf-8") as fout:
        for line in fin:
            if line.strip():
                fout.write(json.dumps(convert_row(json.loads(line)), ensure_ascii=False) + "\n")
                n += 1
    print(f"wrote {n} rows to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
