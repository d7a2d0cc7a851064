"""Each scorer on known answers; the LLM judge against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI

from localroute.errors import ConfigError, UpstreamError
from localroute.evaluation.datasets import EvalItem
from localroute.evaluation.scorers import (
    JudgeScorer,
    extract_choice,
    extract_number,
    parse_rating,
    parse_spans,
    score_answer,
    score_choice,
    score_exact,
    score_json,
    score_numeric,
    score_spans,
    span_f1,
)
from tests.conftest import serve_app

MSG = [{"role": "user", "content": "q"}]


def item(**kw: Any) -> EvalItem:
    return EvalItem(id="x", messages=MSG, **kw)


LABELS = ["card_payment_fee_charged", "card_payment_not_recognised", "card_arrival", "neutral", "negative"]


@pytest.mark.parametrize(
    "output,expected",
    [
        ("card_arrival", "card_arrival"),
        ("  Card_Arrival.  ", "card_arrival"),
        ("card_payment_fee_charged", "card_payment_fee_charged"),
        ("The intent is card_arrival, I think", "card_arrival"),
        ("The sentiment of this tweet is negative, not neutral.", "negative"),
        ("card_payment", None),
        ("I can't help with that", None),
    ],
)
def test_extract_choice_labels(output: str, expected: str | None) -> None:
    assert extract_choice(output, LABELS) == expected


@pytest.mark.parametrize(
    "output,expected",
    [("B", "B"), ("B. 4", "B"), ("(C)", "C"), ("Answer: D", "D"), ("The answer is A.", "A"), ("E", None)],
)
def test_extract_choice_letters(output: str, expected: str | None) -> None:
    assert extract_choice(output, ["A", "B", "C", "D"]) == expected


def test_score_choice_bbh_parenthesised() -> None:
    it = item(task="choice", choices=["(A)", "(B)"], answer="(B)")
    assert score_choice("(B)", it).correct
    assert score_choice("B", it).correct
    assert not score_choice("(A) because", it).correct


def test_exact() -> None:
    it = item(task="exact", answer="apple banana cherry")
    assert score_exact("Apple  banana cherry.\nmore text", it).correct
    assert not score_exact("apple cherry banana", it).correct


@pytest.mark.parametrize(
    "output,value",
    [("She makes 9 * 2 = $18.\n#### 18", 18.0), ("so the total is 1,234 dollars", 1234.0),
     ("#### -3.5", -3.5), ("no number here", None), ("first 3 then 7", 7.0)],
)
def test_extract_number(output: str, value: float | None) -> None:
    assert extract_number(output) == value


def test_numeric() -> None:
    it = item(task="numeric", answer="18")
    assert score_numeric("#### 18", it).correct
    assert score_numeric("The answer is 18.0", it).correct
    assert not score_numeric("#### 17", it).correct
    with pytest.raises(ConfigError):
        score_numeric("1", item(task="numeric", answer="eighteen"))


def test_spans() -> None:
    gold = [{"type": "person", "text": "Nadim Ladki"}, {"type": "location", "text": "Japan"}]
    it = item(task="spans", answer=gold)
    assert score_spans("person: Nadim Ladki\nlocation: JAPAN", it).value == pytest.approx(1.0)
    half = score_spans("person: Nadim Ladki\nlocation: China", it)
    assert half.value == pytest.approx(0.5) and not half.correct
    assert score_spans("none", item(task="spans", answer=[])).correct
    assert parse_spans('[{"type": "time", "text": "7pm"}]') == [("time", "7pm")]
    assert span_f1([("a", "x")], []) == 0.0


def test_json_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    it = item(task="json", schema=schema)
    assert score_json('Here: ```json\n{"n": 3}\n```', it).correct
    assert not score_json('{"n": "three"}', it).correct
    assert not score_json("no json", it).correct
    exact = item(task="json", schema=schema, answer={"n": 3})
    assert score_json('{"n": 3}', exact).correct and not score_json('{"n": 4}', exact).correct


def test_parse_rating() -> None:
    assert parse_rating("Good. Rating: [[8]]") == 8.0
    assert parse_rating("Rating: [[11]]") is None
    assert parse_rating("no rating") is None


def _judge_app(reply: str, seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}

    return app


def test_judge_over_http() -> None:
    seen: list[dict[str, Any]] = []
    it = item(task="judge", answer="Paris")
    with serve_app(_judge_app("Accurate and concise. Rating: [[9]]", seen)) as base:
        judge = JudgeScorer(base, "judge-model", pass_rating=7)

        async def go() -> Any:
            try:
                return await score_answer("It is Paris.", it, judge)
            finally:
                await judge.aclose()

        s = asyncio.run(go())
    assert s.value == pytest.approx(0.9) and s.correct
    prompt = seen[0]["messages"][0]["content"]
    assert seen[0]["model"] == "judge-model" and "It is Paris." in prompt and "Reference Answer" in prompt


def test_judge_without_rating_is_an_upstream_error() -> None:
    with serve_app(_judge_app("I refuse to rate", [])) as base:
        judge = JudgeScorer(base, "m")

        async def go() -> Any:
            try:
                return await judge.score("x", item(task="judge"))
            finally:
                await judge.aclose()

        with pytest.raises(UpstreamError):
            asyncio.run(go())


def test_judge_task_needs_a_judge() -> None:
    with pytest.raises(ConfigError):
        asyncio.run(score_answer("x", item(task="judge")))
