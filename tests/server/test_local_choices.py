"""n > 1, parallel tool calls and tool-call logprobs on the local llama.cpp tier: the real SmolLM2
model behind `localroute serve`'s app (the engine in its supervised process, as served), driven
with the official openai client; the frontier a real recording upstream on 127.0.0.1."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from localroute.backends.tool_calls import parse_calls
from localroute.server.app import create_app
from tests.conftest import local_settings, serve_app
from tests.fault_upstream import Fault, FaultUpstream
from tests.server.test_local_tools import SCHEMAS, TOOLS, WEATHER, ask

pytestmark = pytest.mark.slow

SLOTS = 3
SEA = ask("Write one sentence about the sea.")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    settings = local_settings(tiers=[{"name": "smollm2", "model": "smollm2-135m"}], n_parallel=SLOTS,
                              confidence_aggregator="mean_logprob")
    with serve_app(create_app(settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url, api_key="x", max_retries=0, timeout=180)


def counters(url: str, wait_s: float = 1.0) -> dict[str, int]:
    """The engine's counters, as its process reported them (a heartbeat every 0.25 s)."""
    time.sleep(wait_s)
    health = httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()
    return dict(health["tiers"]["smollm2"]["counters"])


def texts(answer: Any) -> list[str]:
    assert [c.index for c in answer.choices] == list(range(len(answer.choices)))
    return [c.message.content for c in answer.choices]


def test_n3_sampled_choices_are_distinct_reproducible_and_share_one_prefill(client: OpenAI, url: str) -> None:
    before = counters(url, 0)
    answer = client.chat.completions.create(model="smollm2", messages=SEA, n=3, temperature=0.9, seed=11,
                                            max_tokens=16)
    after = counters(url)
    got = texts(answer)
    assert len(got) == 3 and len(set(got)) == 3, got
    assert all(c.finish_reason in ("stop", "length") for c in answer.choices)
    # the prompt prefilled once, its KV copied to the two other choices' sequences
    assert after["prompts_prefilled_total"] - before["prompts_prefilled_total"] == 1
    assert after["kv_copies_total"] - before["kv_copies_total"] == 2
    single = client.chat.completions.create(model="smollm2", messages=SEA, temperature=0.9, seed=11, max_tokens=16)
    # usage: the prompt once, the completions of every choice
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens
    assert answer.usage.completion_tokens > single.usage.completion_tokens
    assert got[0] == single.choices[0].message.content  # choice 0 is the n = 1 answer for the seed
    again = client.chat.completions.create(model="smollm2", messages=SEA, n=3, temperature=0.9, seed=11,
                                           max_tokens=16)
    assert texts(again) == got
    other = client.chat.completions.create(model="smollm2", messages=SEA, n=3, temperature=0.9, seed=12,
                                           max_tokens=16)
    assert texts(other) != got


def test_n3_greedy_choices_are_identical(client: OpenAI) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=SEA, n=3, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=2)
    got = texts(answer)
    assert len(got) == 3 and len(set(got)) == 1 and got[0]
    lps = [[t.logprob for t in c.logprobs.content] for c in answer.choices]
    assert lps[0] == lps[1] == lps[2]


def test_streamed_n2_has_both_indices(client: OpenAI) -> None:
    stream = client.chat.completions.create(model="smollm2", messages=SEA, n=2, temperature=0.9, seed=5,
                                            max_tokens=12, stream=True)
    pieces: dict[int, str] = {}
    finishes: dict[int, str] = {}
    roles: list[int] = []
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.index)
            pieces[c.index] = pieces.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert sorted(roles) == [0, 1] and set(finishes) == {0, 1}
    whole = client.chat.completions.create(model="smollm2", messages=SEA, n=2, temperature=0.9, seed=5,
                                           max_tokens=12)
    assert [pieces[0], pieces[1]] == texts(whole)


def _stream_events(stream: Any) -> tuple[list[tuple[int, str, str | None]], dict[str, Any] | None]:
    """A chat stream's choice events in order as (index, content, finish_reason), and the
    `localroute` block of its last chunk."""
    events: list[tuple[int, str, str | None]] = []
    last = None
    for chunk in stream:
        last = chunk
        for c in chunk.choices:
            events.append((c.index, c.delta.content or "", c.finish_reason))
    assert last is not None
    return events, (last.model_extra or {}).get("localroute")


def _finished_early(events: list[tuple[int, str, str | None]], n: int) -> None:
    """Every choice has one finish chunk, nothing of it after that, and some choice's finish
    chunk went out before another choice's later content."""
    finishes = {i: pos for pos, (i, _, reason) in enumerate(events) if reason is not None}
    assert sorted(finishes) == list(range(n)) and sum(r is not None for _, _, r in events) == n
    for i, pos in finishes.items():
        assert not any(j == i and text for j, text, _ in events[pos + 1:])
    first, pos = min(finishes.items(), key=lambda kv: kv[1])
    assert any(j != first and text for j, text, _ in events[pos + 1:]), events


def test_streamed_n3_sends_each_choice_finish_when_it_is_done(client: OpenAI) -> None:
    """The engine's stream through the server's SSE: the choices end at their first '.', each at
    its own step; a choice's finish chunk goes out when it is done, before the others' later
    content (OpenAI's order), and the last chunk still carries the routing block."""
    args: dict[str, Any] = {"model": "smollm2", "messages": SEA, "n": 3, "temperature": 1.0, "seed": 3,
                            "max_tokens": 48, "stop": ["."]}
    events, info = _stream_events(client.chat.completions.create(**args, stream=True))
    _finished_early(events, 3)
    assert info is not None and info["tier"] == "smollm2"
    whole = client.chat.completions.create(**args)
    pieces = ["".join(t for j, t, _ in events if j == i) for i in range(3)]
    assert pieces == texts(whole)
    finishes = {i: r for i, _, r in events if r is not None}
    assert [finishes[i] for i in range(3)] == [c.finish_reason for c in whole.choices]


def test_more_choices_than_slots_still_answer(client: OpenAI, url: str) -> None:
    before = counters(url, 0)
    answer = client.chat.completions.create(model="smollm2", messages=SEA, n=2 * SLOTS + 1, temperature=1.0,
                                            seed=3, max_tokens=4)
    after = counters(url)
    assert len(texts(answer)) == 2 * SLOTS + 1 and all(texts(answer))
    assert after["prompts_prefilled_total"] - before["prompts_prefilled_total"] == 3  # waves of 3, 3, 1


@pytest.mark.parametrize("n", [0, -1, 129, 10**9])
def test_bad_n_is_a_400(client: OpenAI, n: int) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=SEA, n=n, max_tokens=4)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"  # type: ignore[index]


def test_completions_api_n2(url: str) -> None:
    r = httpx.post(f"{url}/completions", timeout=120, json={
        "model": "smollm2", "prompt": "The sea is", "n": 2, "max_tokens": 6, "temperature": 0.9, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1] and all(c["text"] for c in body["choices"])


def _mean(choice: Any) -> float:
    lps = [t.logprob for t in choice.logprobs.content]
    return sum(lps) / len(lps)


def test_cascade_keeps_n_choices_only_if_every_choice_passes() -> None:
    """The decision's confidence for n choices is the lowest choice's: with the threshold below
    every choice the answer stays local; between the weakest and the strongest choice the whole
    request (n included) goes to the frontier, and its choices come back."""
    sent: dict[str, Any] = {"messages": SEA, "n": 3, "temperature": 1.0, "seed": 21, "max_tokens": 10}
    frontier_answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-test",
                       "choices": [{"index": i, "message": {"role": "assistant", "content": f"frontier {i}"},
                                    "logprobs": None, "finish_reason": "stop"} for i in range(3)],
                       "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}}

    def server(threshold: float, up: FaultUpstream) -> Any:
        return serve_app(create_app(local_settings(tiers=[
            {"name": "smollm2", "model": "smollm2-135m", "threshold": threshold},
            {"name": "frontier", "kind": "openai", "model": "gpt-test", "base_url": up.url, "api_key": "k"}],
            n_parallel=SLOTS, confidence_aggregator="mean_logprob")))

    with FaultUpstream(default=Fault(completion=frontier_answer)) as up:
        with server(-100.0, up) as base:
            c = OpenAI(base_url=base, api_key="x", max_retries=0, timeout=180)
            raw = c.chat.completions.with_raw_response.create(model="localroute/cascade", logprobs=True, **sent)
            local = raw.parse()
            assert raw.headers["x-localroute-tier"] == "smollm2" and len(local.choices) == 3
            means = [_mean(ch) for ch in local.choices]
            assert math.isclose(float(raw.headers["x-localroute-confidence"]), min(means), abs_tol=1e-5)
            # the evidence shows each choice's confidence, the decision the lowest
            per_choice = raw.http_response.json()["localroute"]["evidence"]["choices"]["smollm2"]
            assert [row["index"] for row in per_choice] == [0, 1, 2]
            assert [row["finish_reason"] for row in per_choice] == [ch.finish_reason for ch in local.choices]
            for row, m in zip(per_choice, means, strict=True):
                assert math.isclose(row["confidence"], m, abs_tol=1e-5)
            # streamed, the buffered local answer is replayed choice by choice, each finish after its text
            events, info = _stream_events(c.chat.completions.create(model="localroute/cascade", stream=True, **sent))
            _finished_early(events, 3)
            assert info is not None and info["evidence"]["choices"]["smollm2"] == per_choice
            assert not up.requests
        assert max(means) - min(means) > 1e-3, means
        with server((min(means) + max(means)) / 2, up) as base:
            c = OpenAI(base_url=base, api_key="x", max_retries=0, timeout=180)
            raw = c.chat.completions.with_raw_response.create(model="localroute/cascade", **sent)
            answer = raw.parse()
        assert raw.headers["x-localroute-tier"] == "frontier"
        assert [ch.message.content for ch in answer.choices] == ["frontier 0", "frontier 1", "frontier 2"]
        (forwarded,) = [q["json"] for q in up.requests]
        assert forwarded["n"] == 3 and forwarded["seed"] == 21


# ---- parallel tool calls and tool-call logprobs ----

TWO_THINGS = ask("What's the weather in Paris in celsius, and what time is it in Asia/Tokyo?")


def calls_of(choice: Any) -> list[dict[str, Any]]:
    out = []
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append({"name": call.function.name, "arguments": args})
    assert len({c.id for c in choice.message.tool_calls}) == len(out)
    return out


def test_parallel_calls_greedy_gives_both_calls(client: OpenAI) -> None:
    """Asked two things with parallel_tool_calls: true, SmolLM2's greedy answer is two calls, one
    per line: two `tool_calls` entries, each valid against its own tool's schema."""
    answer = client.chat.completions.create(model="smollm2", messages=TWO_THINGS, tools=TOOLS,
                                            tool_choice="required", max_tokens=150, temperature=0,
                                            parallel_tool_calls=True)
    assert [c["name"] for c in calls_of(answer.choices[0])] == ["get_weather", "get_time"]


@pytest.mark.parametrize("seed", range(3))
def test_parallel_calls_sampled_each_validates(client: OpenAI, seed: int) -> None:
    """Sampled: one or more calls, each valid against its tool's schema, whatever the model
    chooses (an answer cut by max_tokens is no call: it stays text, finish_reason length)."""
    answer = client.chat.completions.create(model="smollm2", messages=TWO_THINGS, tools=TOOLS,
                                            tool_choice="required", max_tokens=150, temperature=0.7, seed=seed,
                                            parallel_tool_calls=True)
    choice = answer.choices[0]
    if choice.finish_reason == "length":
        assert choice.message.tool_calls is None and answer.usage.completion_tokens == 150
    else:
        assert len(calls_of(choice)) >= 1


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_parallel_calls_false_gives_exactly_one(client: OpenAI, temperature: float) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=TWO_THINGS, tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=150,
                                            temperature=temperature, seed=1)
    assert len(calls_of(answer.choices[0])) == 1


def test_tool_calls_with_n2(client: OpenAI) -> None:
    """Each choice is answered as a call (or, cut by max_tokens, as text): by its index."""
    answer = client.chat.completions.create(model="smollm2", messages=ask("Weather in Rome, in celsius?"),
                                            tools=[WEATHER], n=2, max_tokens=160, temperature=1.0, seed=3,
                                            parallel_tool_calls=False)
    assert [c.index for c in answer.choices] == [0, 1]
    # sampled at temperature 1 the grammar allows a long string argument: which choice (if any) runs
    # into max_tokens depends on the CPU's float rounding, so a cut one must be text, not a call
    cut = [c for c in answer.choices if c.finish_reason == "length"]
    for choice in cut:
        assert choice.message.tool_calls is None and choice.message.content, choice
    assert len(cut) < 2, "both choices cut: no call to check"
    for choice in answer.choices:
        if choice not in cut:
            assert [c["name"] for c in calls_of(choice)] == ["get_weather"]


def _joined_calls(content: list[Any]) -> list[dict[str, Any]]:
    """The calls the logprobs' tokens spell, a call repeated word for word kept once (as answered)."""
    calls = parse_calls("".join(t.token for t in content))
    assert calls is not None
    return [c for i, c in enumerate(calls) if c not in calls[:i]]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_logprobs_when_asked(client: OpenAI, stream: bool) -> None:
    """logprobs: true with tools: `logprobs.content` holds the tokens generated for the call (they
    concatenate to the call's JSON), each with its top_logprobs; not asked: null."""
    args: dict[str, Any] = {"model": "smollm2", "messages": ask("Weather in Oslo, in celsius?"), "tools": [WEATHER],
                            "max_tokens": 60, "temperature": 0}
    if stream:
        chunks = list(client.chat.completions.create(**args, logprobs=True, top_logprobs=2, stream=True))
        with_lp = [c for ch in chunks for c in ch.choices if c.logprobs is not None and c.logprobs.content]
        (choice,) = with_lp
        content = choice.logprobs.content
        (call,) = choice.delta.tool_calls
        name, arguments = call.function.name, call.function.arguments
    else:
        answer = client.chat.completions.create(**args, logprobs=True, top_logprobs=2)
        (call,) = answer.choices[0].message.tool_calls
        content = answer.choices[0].logprobs.content
        name, arguments = call.function.name, call.function.arguments
    assert _joined_calls(content) == [{"name": name, "arguments": json.loads(arguments)}]
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert any(t.logprob < 0 for t in content)
    plain = client.chat.completions.create(**args)
    assert plain.choices[0].logprobs is None


def test_cut_tool_choices_of_n2_keep_their_logprobs(client: OpenAI) -> None:
    """A choice cut by max_tokens is text, not a call; asked for logprobs, each of n = 2 has them
    as a cut n = 1 answer has (its tokens concatenate to its text), not null."""
    args: dict[str, Any] = {"model": "smollm2", "messages": ask("Weather in Oslo, in celsius?"), "tools": [WEATHER],
                            "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    single = client.chat.completions.create(**args).choices[0]
    assert single.finish_reason == "length" and single.logprobs is not None
    answer = client.chat.completions.create(**args, n=2)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.finish_reason == "length" and choice.message.tool_calls is None
        assert choice.logprobs is not None and len(choice.logprobs.content) == 6
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content == single.message.content
