"""Task categories: where a request's category comes from, the metrics label cap, and the cascade
applying the category's threshold (scripted tiers; the real-model path is tests/server/test_live_quality.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from localroute.errors import InvalidRequestError
from localroute.routing import CascadeRouter, Tier
from localroute.routing.categories import (
    OTHER,
    CategoryLabels,
    resolve_category,
    split_model_alias,
    strip_category,
)
from localroute.settings import Settings
from localroute.types import GenerationRequest
from tests.fakes import ScriptedBackend

SETTINGS = Settings(categories={
    "classify": {"scorer": "choice", "choices": ["a", "b"], "system_prompt_pattern": r"(?i)classify"},
    "math": {"scorer": "numeric", "system_prompt_pattern": "arithmetic"},
})
ROUTERS = ["localroute/cascade", "smollm2-135m"]


def body(system: str | None = None, **extra: object) -> dict[str, object]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
    return {"model": "localroute/cascade", "messages": messages, **extra}


def test_the_client_names_the_category_in_metadata_or_a_header() -> None:
    got = resolve_category(SETTINGS, body("Classify this", metadata={"localroute_category": "mine"}), {})
    assert (got.name, got.source) == ("mine", "client")  # the client beats the rule
    got = resolve_category(SETTINGS, body(), {"x-localroute-category": "hdr"})
    assert (got.name, got.source) == ("hdr", "client")


def test_alias_then_rule_then_default() -> None:
    assert resolve_category(SETTINGS, body("Classify this"), {}, alias="math").source == "alias"
    got = resolve_category(SETTINGS, body("Please classify the tweet"), {})
    assert (got.name, got.source) == ("classify", "rule")
    got = resolve_category(SETTINGS, body("do arithmetic"), {})
    assert got.name == "math"
    got = resolve_category(SETTINGS, body("be nice"), {})
    assert (got.name, got.source) == ("default", "default")


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "drop;table", 7])
def test_a_bad_client_category_is_a_400_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        resolve_category(SETTINGS, body(metadata={"localroute_category": bad}), {})
    assert exc.value.param == "metadata.localroute_category" and exc.value.status_code == 400


def test_model_alias_splits_only_onto_a_known_router() -> None:
    assert split_model_alias("localroute/cascade:classify", ROUTERS) == ("localroute/cascade", "classify")
    assert split_model_alias("localroute/cascade", ROUTERS) == ("localroute/cascade", None)
    assert split_model_alias("gpt-4o:latest", ROUTERS) == ("gpt-4o:latest", None)  # unknown: left for the 404


def test_strip_category_keeps_other_metadata() -> None:
    assert strip_category(body(metadata={"localroute_category": "x", "user": "u"}))["metadata"] == {"user": "u"}
    assert "metadata" not in strip_category(body(metadata={"localroute_category": "x"}))
    # metadata.labels is localroute's too (label confidence); OpenAI caps metadata values at 512 chars
    long = '["' + '", "'.join(f"label{i}" for i in range(100)) + '"]'
    assert strip_category(body(metadata={"labels": long, "user": "u"}))["metadata"] == {"user": "u"}
    assert "metadata" not in strip_category(body(metadata={"labels": "a|b", "localroute_category": "x"}))


def test_metrics_labels_are_capped() -> None:
    labels = CategoryLabels(SETTINGS.model_copy(update={"category_max_labels": 4}))
    assert [labels.label(c) for c in ("default", "classify", "math", "new1", "new2", "new3")] == [
        "default", "classify", "math", "new1", OTHER, OTHER]
    assert labels.label("new1") == "new1"


def test_the_cascade_applies_the_category_threshold() -> None:
    local = ScriptedBackend("a", "local answer", [-0.5, -0.5])
    frontier = ScriptedBackend("f", "frontier answer", [-0.01], local=False)
    tier = Tier("a", local, -1.0, category_thresholds={"strict": -0.1})
    router = CascadeRouter([tier, Tier("f", frontier, None)])
    req = GenerationRequest(messages=({"role": "user", "content": "hi"},))
    kept = asyncio.run(router.route(req))
    assert kept.decision.answered_by == "a" and kept.decision.attempts[0].threshold == -1.0
    escalated = asyncio.run(router.route(replace(req, category="strict")))
    assert escalated.decision.answered_by == "f" and escalated.decision.attempts[0].threshold == -0.1
    assert asyncio.run(router.route(replace(req, category="unknown"))).decision.answered_by == "a"  # pooled
