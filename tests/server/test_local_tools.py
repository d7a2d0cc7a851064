"""Tool calling, logit_bias and penalties on the local llama.cpp tier: the real SmolLM2 model behind
`localroute serve`'s app (the engine in its supervised process, as served), driven with the
official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from localroute.server.app import create_app
from tests.conftest import local_settings, serve_app

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in an IANA timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["What's the weather in Paris?", "What time is it in Tokyo?", "What is 17 plus 25?",
           "Is it raining in London right now, in fahrenheit?", "Tell me a joke.", "Add 3 and 4 please."]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    settings = local_settings(tiers=[{"name": "smollm2", "model": "smollm2-135m"}], n_parallel=2)
    with serve_app(create_app(settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def valid_call(call: Any, names: set[str]) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    args: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_call_parses_and_validates_against_its_tools_schema(client: OpenAI, prompt: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=ask(prompt), tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
    answer = raw.parse()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls  # parallel_tool_calls omitted: exactly one call
    valid_call(call, set(SCHEMAS))
    assert raw.headers["x-localroute-tier"] == "smollm2"
    assert float(raw.headers["x-localroute-confidence"]) < 0  # from the call's tokens, a real number
    assert answer.usage.completion_tokens > 5


def test_sampled_calls_validate_too(client: OpenAI) -> None:
    """Sampled (temperature 1) answers are calls whose arguments validate. A ramble cut by
    max_tokens is not a call and is skipped, but the test cannot pass on skips alone: at least one
    call must be produced and validated. max_tokens is ample: these four calls take 20 to 46 tokens
    (seeds 0-7 with SmolLM2-135M Q4_1), so 256 leaves a sampled string argument 5x room."""
    validated, finishes = 0, []
    for seed in range(4):
        answer = client.chat.completions.create(model="smollm2", messages=ask("Weather in Rome?"), tools=TOOLS,
                                                max_tokens=256, temperature=1.0, seed=seed)
        choice = answer.choices[0]
        finishes.append(choice.finish_reason)
        if choice.finish_reason == "length":  # a sampled ramble can run out of tokens: that is not a call
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
        valid_call(choice.message.tool_calls[0], set(SCHEMAS))
        validated += 1
    assert validated >= 1, f"no sampled answer was a call to validate: {finishes}"


def test_named_tool_choice_calls_that_tool(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=ask("What's the weather in Paris?"), tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "add"}})
    args = valid_call(answer.choices[0].message.tool_calls[0], {"add"})
    assert set(args) == {"a", "b"}


def test_auto_is_a_call_and_none_is_text(client: OpenAI) -> None:
    auto = client.chat.completions.create(model="smollm2", messages=ask("What time is it in Tokyo?"), tools=TOOLS,
                                          tool_choice="auto", max_tokens=80, temperature=0)
    assert auto.choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(model="smollm2", messages=ask("Say hello."), tools=TOOLS,
                                          tool_choice="none", max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_streamed_call_is_assembled_by_the_client(client: OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="smollm2", messages=ask("What is 17 plus 25?"), tools=TOOLS,
                                                tool_choice="required", max_tokens=80, temperature=0, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.id or ""
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] in SCHEMAS
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])


def test_a_tool_result_turn_is_answered_in_text(client: OpenAI) -> None:
    first = client.chat.completions.create(model="smollm2", messages=ask("What is 17 plus 25?"), tools=[ADD],
                                           max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ask("What is 17 plus 25?"),
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
               {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    answer = client.chat.completions.create(model="smollm2", messages=history, tools=[ADD], tool_choice="none",
                                            max_tokens=16, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_a_schema_the_grammar_cannot_take_is_a_400_naming_tools(url: str) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/remote.json"}}}}}
    r = httpx.post(f"{url}/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": ask("hi"), "tools": [bad], "max_tokens": 8})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools" and "unsupported schema" in err["message"], err


def test_logit_bias_and_penalties_are_served_by_the_local_tier(client: OpenAI) -> None:
    """No longer skipped for a capability: a -100 bias on the greedy first token changes it."""
    import llama_cpp

    from tests.conftest import MODELS_DIR

    kw: dict[str, Any] = {"model": "smollm2", "messages": ask("What is the capital of France?"), "max_tokens": 3,
                          "temperature": 0, "logprobs": True}
    first = client.chat.completions.create(**kw).choices[0].logprobs.content[0].token
    vocab = llama_cpp.Llama(str(next(MODELS_DIR.glob("SmolLM2*.gguf"))), vocab_only=True, verbose=False)
    (token_id,) = vocab.tokenize(first.encode(), add_bos=False, special=False)
    raw = client.chat.completions.with_raw_response.create(**kw, logit_bias={str(token_id): -100},
                                                           presence_penalty=0.5, frequency_penalty=0.5)
    assert raw.headers["x-localroute-tier"] == "smollm2"
    assert raw.parse().choices[0].logprobs.content[0].token != first


@pytest.mark.parametrize("stream", [False, True])
def test_in_a_cascade_a_confident_call_is_the_local_tiers_and_an_unsure_one_escalates(stream: bool) -> None:
    """The local tier as a non-final tier (its answer judged, then replayed): a call it is sure of
    (threshold far below any confidence) comes back from it; with the threshold above any
    confidence the frontier gets the body as sent, tools included, and its call comes back."""
    from tests.fault_upstream import Fault, FaultUpstream
    from tests.server.test_clients import completion, tool_chunks, tool_message

    sent: dict[str, Any] = {"model": "localroute/cascade", "messages": ask("What's the weather in Paris?"),
                            "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0,
                            "stream": stream}
    with FaultUpstream() as up:
        for threshold, tier in ((-100.0, "smollm2"), (0.5, "frontier")):
            args = {"city": "Paris", "unit": "celsius"}
            if tier == "frontier":
                up.script(Fault(chunks=tool_chunks("get_weather", args)) if stream else
                          Fault(completion=completion(tool_message("get_weather", args), finish="tool_calls")))
            settings = local_settings(tiers=[
                {"name": "smollm2", "model": "smollm2-135m", "threshold": threshold},
                {"name": "frontier", "kind": "openai", "model": "gpt-test", "base_url": up.url, "api_key": "k"}],
                n_parallel=1, engine_isolation="thread")
            before = len(up.requests)
            with serve_app(create_app(settings)) as base:
                r = httpx.post(f"{base}/chat/completions", json=sent, timeout=120)
            assert r.status_code == 200 and r.headers["x-localroute-tier"] == tier, r.text
            if stream:
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
                choices = [c for e in events for c in e["choices"]]
                assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["tool_calls"]
                pieces = [tc for c in choices for tc in c["delta"].get("tool_calls") or ()]
                assert {p["index"] for p in pieces} == {0}
                call = {"id": "".join(p.get("id") or "" for p in pieces), "function": {
                    "name": "".join(p["function"].get("name") or "" for p in pieces),
                    "arguments": "".join(p["function"].get("arguments") or "" for p in pieces)}}
            else:
                (choice,) = r.json()["choices"]
                assert choice["finish_reason"] == "tool_calls"
                (call,) = choice["message"]["tool_calls"]
            assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_weather"])
            forwarded = [q["json"] for q in up.requests[before:]]
            if tier == "smollm2":
                assert forwarded == []
            else:
                assert len(forwarded) == 1 and forwarded[0]["tools"] == [WEATHER]
                assert forwarded[0]["tool_choice"] == "required"


LONDON = ask("Is it raining in London right now, in fahrenheit?")


@pytest.mark.parametrize("parallel", [None, False, True])
def test_several_calls_only_when_the_client_sends_parallel_tool_calls_true(client: OpenAI,
                                                                           parallel: bool | None) -> None:
    """OpenAI's parallel_tool_calls allows several calls, it does not ask for them: omitted (or
    false) the local answer is exactly one call; SmolLM2 offered more (true) adds spurious ones on
    this prompt, greedy (get_weather, then get_time and add), which shows the grammar takes them.
    The value crosses the engine process's bridge as sent (None is not True)."""
    extra: dict[str, Any] = {} if parallel is None else {"parallel_tool_calls": parallel}
    answer = client.chat.completions.create(model="smollm2", messages=LONDON, tools=TOOLS, tool_choice="required",
                                            max_tokens=150, temperature=0, **extra)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    names = [valid_call(c, set(SCHEMAS)) and c.function.name for c in choice.message.tool_calls]
    if parallel:
        assert len(names) >= 2 and names[0] == "get_weather", names
    else:
        assert names == ["get_weather"]
