"""A local answer against the frontier's, with the category's scorer and the frontier's answer as gold."""

from __future__ import annotations

import pytest

from localroute.evaluation.agreement import agreement

LABELS = ["negative", "neutral", "positive"]


@pytest.mark.parametrize(("scorer", "local", "frontier", "choices", "agrees"), [
    ("choice", "Positive!", "The sentiment is positive.", LABELS, True),
    ("choice", "negative", "positive", LABELS, False),
    ("numeric", "The answer is 12", "#### 12", None, True),
    ("numeric", "13", "12", None, False),
    ("exact", "Paris\nmore text", "paris", None, True),
    ("json", '{"a": 1}', 'Here: {"a": 1}', None, True),
    ("json", '{"a": 2}', '{"a": 1}', None, False),
    ("spans", "person: Ada\nplace: London", "place: london\nperson: ada", None, True),
])
def test_agreement_uses_the_category_scorer(scorer: str, local: str, frontier: str, choices: list[str] | None,
                                            agrees: bool) -> None:
    result = agreement(scorer, local, frontier, choices)
    assert result is not None and result[1] is agrees


@pytest.mark.parametrize(("scorer", "frontier", "choices"), [
    ("numeric", "I cannot say", None), ("choice", "no idea", LABELS), ("json", "not json", None), ("exact", "  ", None)])
def test_nothing_to_compare_with_is_none(scorer: str, frontier: str, choices: list[str] | None) -> None:
    assert agreement(scorer, "anything", frontier, choices) is None
