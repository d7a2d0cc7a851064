"""Does a local answer agree with the frontier's? The category's scorer (scorers.py) with the
frontier's answer as the gold label: the choice it names, its final number, its JSON value, its
spans, or its first line (exact). Used by the shadow evaluation (monitoring/shadow.py)."""

from __future__ import annotations

from typing import Any

from localroute.evaluation.datasets import EvalItem
from localroute.evaluation.scorers import (
    LOCAL_SCORERS,
    extract_choice,
    extract_json,
    extract_number,
    parse_spans,
)

__all__ = ["agreement"]


def _gold(scorer: str, frontier: str, choices: list[str] | None) -> tuple[str, Any] | None:
    """(task, gold answer) read off the frontier's answer; None when it gives none to compare with."""
    if scorer == "choice" and choices:
        picked = extract_choice(frontier, choices)
        return None if picked is None else ("choice", picked)
    if scorer == "numeric":
        number = extract_number(frontier)
        return None if number is None else ("numeric", number)
    if scorer == "json":
        try:
            return "json", extract_json(frontier)
        except ValueError:
            return None
    if scorer == "spans":
        return "spans", [{"type": t, "text": x} for t, x in parse_spans(frontier)]
    first = frontier.strip().splitlines()[0] if frontier.strip() else ""
    return ("exact", first) if first else None


def agreement(scorer: str, local: str, frontier: str, choices: list[str] | None = None) -> tuple[float, bool] | None:
    """(score in [0, 1], agrees) of the local answer against the frontier's, or None when the
    frontier's answer has nothing of the kind to compare with (e.g. no number for `numeric`)."""
    gold = _gold(scorer, frontier, choices)
    if gold is None:
        return None
    task, answer = gold
    # the scorers read only task, choices and answer; no prompt to validate here
    item = EvalItem.model_construct(id="shadow", task=task, choices=choices if task == "choice" else None,  # type: ignore[arg-type]
                                    answer=answer, schema_=None)
    score = LOCAL_SCORERS[task](local, item)
    return score.value, score.correct
