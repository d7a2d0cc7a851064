"""Escalation end to end: localroute (SmolLM2) in front of a real OpenAI-compatible frontier on
127.0.0.1 (a second localroute serving the gemma-3-270m tier), driven by the openai client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from localroute.server import create_app
from tests.conftest import local_settings, serve_app

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def frontier_url() -> Iterator[str]:
    settings = local_settings(tiers=[{"name": "gemma-3-270m", "kind": "llama_cpp", "model": "gemma-3-270m"}])
    with serve_app(create_app(settings)) as url:
        yield url


def router_app(frontier_url: str, threshold: float):  # type: ignore[no-untyped-def]
    return create_app(local_settings(tiers=[
        {"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m", "threshold": threshold},
        {"name": "frontier", "kind": "openai", "model": "gemma-3-270m", "base_url": frontier_url,
         "api_key": "sk-test-frontier"},
    ]))


@pytest.fixture(scope="module")
def permissive(frontier_url: str) -> Iterator[OpenAI]:
    with serve_app(router_app(frontier_url, threshold=-100.0)) as url:
        yield OpenAI(base_url=url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def strict(frontier_url: str) -> Iterator[OpenAI]:
    with serve_app(router_app(frontier_url, threshold=0.0)) as url:  # mean logprob is never >= 0
        yield OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_low_threshold_keeps_answers_local(permissive: OpenAI) -> None:
    raw = permissive.chat.completions.with_raw_response.create(
        model="localroute/cascade", messages=MSG, max_tokens=8, temperature=0)
    assert raw.headers["x-localroute-tier"] == "smollm2-135m"
    assert raw.headers["x-localroute-escalated"] == "false"
    info = raw.parse().model_extra["localroute"]
    assert [a["tier"] for a in info["attempts"]] == ["smollm2-135m"]


def test_high_threshold_escalates_to_frontier(strict: OpenAI, frontier_url: str) -> None:
    raw = strict.chat.completions.with_raw_response.create(
        model="localroute/cascade", messages=MSG, max_tokens=8, temperature=0)
    assert raw.headers["x-localroute-tier"] == "frontier"
    assert raw.headers["x-localroute-escalated"] == "true"
    body = raw.parse()
    info = body.model_extra["localroute"]
    assert [(a["tier"], a["accepted"]) for a in info["attempts"]] == [("smollm2-135m", False), ("frontier", True)]
    assert info["attempts"][0]["confidence"] < 0.0
    # the answer is the frontier's: same text as asking the frontier directly
    direct = OpenAI(base_url=frontier_url, api_key="x", max_retries=0).chat.completions.create(
        model="gemma-3-270m", messages=MSG, max_tokens=8, temperature=0)
    assert body.choices[0].message.content == direct.choices[0].message.content
    assert body.usage.completion_tokens == direct.usage.completion_tokens


def test_escalated_stream_sends_only_the_frontier_answer(strict: OpenAI, frontier_url: str) -> None:
    chunks = list(strict.chat.completions.create(model="localroute/cascade", messages=MSG, max_tokens=8,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = OpenAI(base_url=frontier_url, api_key="x", max_retries=0).chat.completions.create(
        model="gemma-3-270m", messages=MSG, max_tokens=8, temperature=0)
    assert text == direct.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.model_extra["localroute"]["tier"] == "frontier"
    assert final.model_extra["localroute"]["escalated"] is True


def test_tier_name_bypasses_routing(strict: OpenAI) -> None:
    raw = strict.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=MSG, max_tokens=4, temperature=0)
    assert raw.headers["x-localroute-tier"] == "smollm2-135m"
    assert raw.headers["x-localroute-escalated"] == "false"
