"""Real application traffic through localroute, driven by the client libraries themselves (the
official openai client, litellm, langchain-openai, instructor), against a real HTTP upstream on
127.0.0.1 that records what it receives and answers with scripted tool calls, refusals and
multi-choice answers. Each test checks the exact body that reached the upstream (the client's own,
with `model` replaced) and the exact answer the client got (the provider's, with localroute's id,
model, `usage.cost` and `localroute` block), streamed and not.

The ladder: a text-only local tier ("small", scripted, confident) under the frontier. Plain chat
stays local; tools, n > 1, images skip "small" (evidence `skipped`); a JSON format "small" cannot
meet is vetoed and escalates.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.monitoring.record import RequestRecord
from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no price-map download

UPSTREAM_MODEL = "gpt-test"
CASCADE = "localroute/cascade"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
USAGE = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


FRONTIER_COST = (20 * 2.5 + 10 * 10.0) / 1e6  # USAGE at the frontier's prices


class Weather(BaseModel):
    city: str
    temp_c: int


def completion(*messages: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    """A provider's chat.completion with one choice per message, every field a provider sends."""
    return {"id": "chatcmpl-upstream", "object": "chat.completion", "created": 1700000000,
            "model": "gpt-test-2024-08-06", "system_fingerprint": "fp_test", "service_tier": "default",
            "choices": [{"index": i, "message": {"refusal": None, "annotations": [], **m}, "logprobs": None,
                         "finish_reason": finish} for i, m in enumerate(messages)],
            "usage": USAGE}


def tool_message(name: str, arguments: dict[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def tool_chunks(name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """A provider's stream of one tool call: the call's head, its arguments in two pieces, the
    finish, the usage chunk."""
    base = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-test-2024-08-06", "system_fingerprint": "fp_test"}
    args = json.dumps(arguments)
    cut = len(args) // 2

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None}

    return [
        choice({"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}]}),
        choice({"tool_calls": [{"index": 0, "function": {"arguments": args[:cut]}}]}),
        choice({"tool_calls": [{"index": 0, "function": {"arguments": args[cut:]}}]}),
        choice({}, "tool_calls"),
        {**base, "choices": [], "usage": USAGE},
    ]


class Ladder:
    def __init__(self, base_url: str, up: FaultUpstream, records: list[RequestRecord], log: Path) -> None:
        self.url, self.up, self.records, self.log = base_url, up, records, log

    def script(self, fault: Fault) -> int:
        """Queue the upstream's next answer; the number of requests it has seen so far."""
        self.up.script(fault)
        return len(self.up.requests)

    def forwarded(self, before: int) -> dict[str, Any]:
        """The one body the upstream received since `before`."""
        assert len(self.up.requests) == before + 1, [r["json"] for r in self.up.requests[before:]]
        body: dict[str, Any] = self.up.requests[before]["json"]
        assert self.up.requests[before]["path"] == "/v1/chat/completions"
        return body

    def record(self, request_id: str) -> RequestRecord:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for rec in self.records:
                if rec.request_id == request_id:
                    return rec
            time.sleep(0.01)
        raise AssertionError(f"no record for {request_id}")

    def client_body(self, request_id: str) -> dict[str, Any]:
        """The body the client sent, as localroute received it."""
        wire = self.record(request_id).extra["request"].wire
        assert wire is not None and wire.api == "chat"
        return dict(wire.body)

    def evidence(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with sqlite3.connect(self.log) as db:
                row = db.execute("SELECT evidence FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is not None:
                return json.loads(row[0]) if row[0] else {}
            time.sleep(0.05)
        raise AssertionError(f"no routing-log row for {request_id}")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ladder]:
    log = tmp_path_factory.mktemp("log") / "routing.db"
    records: list[RequestRecord] = []
    with FaultUpstream() as up:
        frontier = OpenAIHTTPBackend("frontier", up.url, UPSTREAM_MODEL, api_key="sk-test",
                                     input_usd_per_mtok=2.5, output_usd_per_mtok=10.0)
        tiers = [Tier("small", ScriptedBackend("small", "ok fine", -0.1), threshold=-1.0),
                 Tier("frontier", frontier, None)]
        app = create_app(Settings(routing_log_path=log), tiers=tiers, observers=[records.append])
        with serve_app(app) as url:
            yield Ladder(url, up, records, log)


@pytest.fixture()
def client(ladder: Ladder) -> OpenAI:
    return OpenAI(base_url=ladder.url, api_key="unused", max_retries=0)


def passed_through(answer: dict[str, Any], scripted: dict[str, Any], model: str = CASCADE) -> None:
    """The client's answer is the provider's, with localroute's id, model, cost and routing block."""
    assert answer["id"].startswith("chatcmpl-") and answer["id"] != scripted["id"]
    assert answer["model"] == model
    info = answer["localroute"]
    assert answer["usage"] == {**scripted["usage"], "cost": info["cost_usd"]}
    frontier = [a for a in info["cost_inputs"] if a["tier"] == "frontier"]
    assert [a["cost_usd"] for a in frontier] == [pytest.approx(FRONTIER_COST)]
    assert info["cost_usd"] >= FRONTIER_COST  # plus what a local attempt cost, if one was made
    same = {k: v for k, v in answer.items() if k not in ("id", "model", "usage", "localroute")}
    assert same == {k: v for k, v in scripted.items() if k not in ("id", "model", "usage")}


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# ---------- the official openai client ----------


def test_plain_chat_stays_local_and_reports_its_cost(client: OpenAI, ladder: Ladder) -> None:
    before = len(ladder.up.requests)
    raw = client.chat.completions.with_raw_response.create(model=CASCADE, messages=ASK, max_tokens=8)
    body = raw.parse()
    assert raw.headers["x-localroute-tier"] == "small" and body.choices[0].message.content == "ok fine"
    assert body.usage is not None and body.usage.model_extra["cost"] == body.model_extra["localroute"]["cost_usd"]
    assert len(ladder.up.requests) == before


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tools_reach_the_frontier_as_sent_and_its_tool_call_comes_back(client: OpenAI, ladder: Ladder,
                                                                        tool_choice: Any) -> None:
    scripted = completion(tool_message("get_weather", {"city": "Paris"}), finish="tool_calls")
    before = ladder.script(Fault(completion=scripted))
    sent = {"messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": tool_choice, "parallel_tool_calls": False,
            "max_completion_tokens": 50, "user": "u-1", "metadata": {"job": "x"}, "service_tier": "auto",
            "presence_penalty": 0.5, "logit_bias": {"5230": -100}}
    raw = client.chat.completions.with_raw_response.create(model=CASCADE, **sent)
    assert ladder.forwarded(before) == {**sent, "model": UPSTREAM_MODEL}
    answer = raw.http_response.json()
    passed_through(answer, scripted)
    assert raw.headers["x-localroute-tier"] == "frontier"
    assert "x-localroute-confidence" not in raw.headers  # no logprobs: no confidence, not -1e9
    assert answer["localroute"]["evidence"]["skipped"] == {"small": "tools"}
    assert ladder.evidence(answer["id"])["skipped"] == {"small": "tools"}
    call = raw.parse().choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_1", "get_weather",
                                                                                   {"city": "Paris"})


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_tool_call_passes_through_chunk_by_chunk(client: OpenAI, ladder: Ladder,
                                                          include_usage: bool) -> None:
    scripted = tool_chunks("get_weather", {"city": "Paris"})
    before = ladder.script(Fault(chunks=scripted))
    sent: dict[str, Any] = {"model": CASCADE, "messages": ASK, "tools": [WEATHER_TOOL], "stream": True}
    if include_usage:
        sent["stream_options"] = {"include_usage": True}
    r = httpx.post(f"{ladder.url}/chat/completions", json=sent, timeout=30)
    assert r.status_code == 200 and r.headers["x-localroute-tier"] == "frontier"
    assert ladder.forwarded(before) == {**sent, "model": UPSTREAM_MODEL, "stream_options": {"include_usage": True}}
    got = sse(r)
    expected = scripted if include_usage else scripted[:-1]  # a usage chunk nobody asked for is dropped
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        extra = {"localroute"} if mine is got[-1] else set()
        assert set(mine) == set(theirs) | extra
        assert mine["model"] == CASCADE and mine["id"] == got[0]["id"] != theirs["id"]
        rest = {k: v for k, v in mine.items() if k not in {"id", "model", "usage", *extra}}
        assert rest == {k: v for k, v in theirs.items() if k not in {"id", "model", "usage"}}
    if include_usage:
        assert got[-1]["usage"] == {**USAGE, "cost": got[-1]["localroute"]["cost_usd"]}
    assert got[-1]["localroute"]["evidence"]["skipped"] == {"small": "tools"}
    # and the official client assembles the call from those deltas
    ladder.script(Fault(chunks=scripted))
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**sent):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert finish == "tool_calls" and calls == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_tool_history_round_trips_exactly(client: OpenAI, ladder: Ladder) -> None:
    scripted = completion({"role": "assistant", "content": "It is 21 C in Paris."})
    before = ladder.script(Fault(completion=scripted))
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": '{"temp_c": 19}'}]}]
    raw = client.chat.completions.with_raw_response.create(model=CASCADE, messages=history, tools=[WEATHER_TOOL])
    assert ladder.forwarded(before) == {"model": UPSTREAM_MODEL, "messages": history, "tools": [WEATHER_TOOL]}
    passed_through(raw.http_response.json(), scripted)


def test_parse_gets_the_structured_answer_and_the_refusal(client: OpenAI, ladder: Ladder) -> None:
    ok = completion({"role": "assistant", "content": '{"city": "Paris", "temp_c": 21}'})
    before = ladder.script(Fault(completion=ok))
    parsed = client.chat.completions.parse(model=CASCADE, messages=ASK, response_format=Weather)
    body = ladder.forwarded(before)
    assert body["response_format"]["type"] == "json_schema" and body["response_format"]["json_schema"]["strict"]
    assert body == {**ladder.client_body(parsed.id), "model": UPSTREAM_MODEL}
    assert parsed.choices[0].message.parsed == Weather(city="Paris", temp_c=21)
    # "small" answered first and broke the schema: vetoed, escalated
    assert "small" in parsed.model_extra["localroute"]["evidence"]["schema_violations"]

    refused = completion({"role": "assistant", "content": None, "refusal": "I can't help with that."})
    before = ladder.script(Fault(completion=refused))
    raw = client.chat.completions.with_raw_response.parse(model=CASCADE, messages=ASK, response_format=Weather)
    passed_through(raw.http_response.json(), refused)
    message = raw.parse().choices[0].message
    assert message.refusal == "I can't help with that." and message.parsed is None


def test_multiple_choices_and_content_filter_pass_through(client: OpenAI, ladder: Ladder) -> None:
    scripted = completion({"role": "assistant", "content": "Sunny."}, {"role": "assistant", "content": "Rainy."},
                          finish="content_filter")
    before = ladder.script(Fault(completion=scripted))
    raw = client.chat.completions.with_raw_response.create(model=CASCADE, messages=ASK, n=2, seed=7)
    assert ladder.forwarded(before) == {"model": UPSTREAM_MODEL, "messages": ASK, "n": 2, "seed": 7}
    answer = raw.http_response.json()
    passed_through(answer, scripted)
    assert answer["localroute"]["evidence"]["skipped"] == {"small": "n"}
    assert [c.message.content for c in raw.parse().choices] == ["Sunny.", "Rainy."]
    assert {c.finish_reason for c in raw.parse().choices} == {"content_filter"}


def test_images_reach_a_tier_that_reads_them(client: OpenAI, ladder: Ladder) -> None:
    scripted = completion({"role": "assistant", "content": "A cat."})
    before = ladder.script(Fault(completion=scripted))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                                "detail": "low"}}]}]
    raw = client.chat.completions.with_raw_response.create(model=CASCADE, messages=messages)
    assert ladder.forwarded(before) == {"model": UPSTREAM_MODEL, "messages": messages}
    answer = raw.http_response.json()
    passed_through(answer, scripted)
    assert answer["localroute"]["evidence"]["skipped"] == {"small": "images"}


def test_a_whole_frontier_answer_streams_as_one_chunk_with_its_tool_calls(tmp_path: Path) -> None:
    """A remote tier that is not the last one answers whole (buffered); when the cascade falls back
    to that answer (here the last tier is down: degraded), a streaming client gets it as one chunk
    per choice, tool calls indexed as deltas are, then the finish, nothing lost."""
    from localroute.errors import UpstreamError

    scripted = completion(tool_message("get_weather", {"city": "Paris"}), finish="tool_calls")
    with FaultUpstream() as up:
        up.script(Fault(completion=scripted))
        frontier = OpenAIHTTPBackend("frontier", up.url, UPSTREAM_MODEL, api_key="sk-test")
        down = ScriptedBackend("big", local=False, error=UpstreamError("down", code="upstream_unavailable"))
        app = create_app(Settings(routing_log_path=tmp_path / "r.db"),
                         tiers=[Tier("frontier", frontier, 0.0), Tier("big", down, None)])
        with serve_app(app) as url:
            sent = {"model": CASCADE, "messages": ASK, "tools": [WEATHER_TOOL], "stream": True}
            r = httpx.post(f"{url}/chat/completions", json=sent, timeout=30)
        assert up.requests[0]["json"] == {"model": UPSTREAM_MODEL, "messages": ASK, "tools": [WEATHER_TOOL],
                                          "stream": False}
    assert r.headers["x-localroute-degraded"] == "big_upstream_unavailable"
    (chunk,) = sse(r)
    assert chunk["localroute"]["tier"] == "frontier"
    (choice,) = chunk["choices"]
    message = scripted["choices"][0]["message"]
    assert choice == {"index": 0, "logprobs": None, "finish_reason": "tool_calls", "delta": {
        **message, "tool_calls": [{"index": 0, **message["tool_calls"][0]}]}}


def test_models_retrieve(client: OpenAI) -> None:
    for model_id in (CASCADE, "small", "frontier"):
        m = client.models.retrieve(model_id)
        assert (m.id, m.object, m.owned_by) == (model_id, "model", "localroute")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


# ---------- litellm ----------


def test_litellm_tools_and_its_cost(ladder: Ladder) -> None:
    import litellm

    scripted = completion(tool_message("get_weather", {"city": "Paris"}), finish="tool_calls")
    before = ladder.script(Fault(completion=scripted))
    resp = litellm.completion(model=f"openai/{CASCADE}", api_base=ladder.url, api_key="unused", messages=ASK,
                              tools=[WEATHER_TOOL], tool_choice="auto")
    assert ladder.forwarded(before) == {**ladder.client_body(resp.id), "model": UPSTREAM_MODEL}
    assert ladder.forwarded(before)["tools"] == [WEATHER_TOOL]
    call = resp.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert resp.choices[0].finish_reason == "tool_calls"
    # litellm takes an OpenAI-compatible upstream's usage.cost as the call's cost
    assert resp._hidden_params["response_cost"] == pytest.approx(FRONTIER_COST)


def test_litellm_stream(ladder: Ladder) -> None:
    import litellm

    before = ladder.script(Fault(chunks=tool_chunks("get_weather", {"city": "Paris"})))
    stream = litellm.completion(model=f"openai/{CASCADE}", api_base=ladder.url, api_key="unused", messages=ASK,
                                tools=[WEATHER_TOOL], stream=True)
    chunks = list(stream)
    assert ladder.forwarded(before)["stream_options"] == {"include_usage": True}
    rebuilt = litellm.stream_chunk_builder(chunks)
    call = rebuilt.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})


# ---------- langchain-openai ----------


def _chat_model(ladder: Ladder) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=CASCADE, base_url=ladder.url, api_key="unused", max_retries=0)  # type: ignore[arg-type]


def test_langchain_bind_tools(ladder: Ladder) -> None:
    scripted = completion(tool_message("get_weather", {"city": "Paris"}), finish="tool_calls")
    before = ladder.script(Fault(completion=scripted))
    msg = _chat_model(ladder).bind_tools([WEATHER_TOOL]).invoke("What is the weather in Paris?")
    body = ladder.forwarded(before)
    assert body["tools"] == [WEATHER_TOOL] and body["model"] == UPSTREAM_MODEL
    assert msg.tool_calls == [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]
    assert msg.response_metadata["token_usage"]["cost"] == pytest.approx(FRONTIER_COST)
    assert msg.response_metadata["finish_reason"] == "tool_calls"

    before = ladder.script(Fault(chunks=tool_chunks("get_weather", {"city": "Lyon"})))
    merged = None
    for piece in _chat_model(ladder).bind_tools([WEATHER_TOOL]).stream("And in Lyon?"):
        merged = piece if merged is None else merged + piece
    assert ladder.forwarded(before)["stream"] is True
    assert merged is not None and merged.tool_calls == [
        {"name": "get_weather", "args": {"city": "Lyon"}, "id": "call_1", "type": "tool_call"}]


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_with_structured_output(ladder: Ladder, method: str) -> None:
    value = {"city": "Paris", "temp_c": 21}
    if method == "function_calling":
        scripted = completion(tool_message("Weather", value), finish="tool_calls")
    else:
        scripted = completion({"role": "assistant", "content": json.dumps(value)})
    before = ladder.script(Fault(completion=scripted))
    prompt = "Weather in Paris as JSON with keys city and temp_c."
    out = _chat_model(ladder).with_structured_output(Weather, method=method).invoke(prompt)
    body = ladder.forwarded(before)
    if method == "function_calling":
        assert body["tools"][0]["function"]["name"] == "Weather" and "tool_choice" in body
    elif method == "json_schema":
        assert body["response_format"]["type"] == "json_schema"
    else:
        assert body["response_format"] == {"type": "json_object"}
    assert out == Weather(**value)


# ---------- instructor ----------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor(ladder: Ladder, mode: str) -> None:
    import instructor

    value = {"city": "Paris", "temp_c": 21}
    if mode == "TOOLS":
        scripted = completion(tool_message("Weather", value), finish="tool_calls")
    else:
        scripted = completion({"role": "assistant", "content": json.dumps(value)})
    before = ladder.script(Fault(completion=scripted))
    client = instructor.from_openai(OpenAI(base_url=ladder.url, api_key="unused", max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    out = client.chat.completions.create(model=CASCADE, response_model=Weather, max_retries=0,
                                         messages=[{"role": "user", "content": "Weather in Paris?"}])
    body = ladder.forwarded(before)
    if mode == "TOOLS":
        assert body["tools"][0]["function"]["name"] == "Weather"
        assert body["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}
    else:
        assert body["response_format"]["type"] == "json_schema"
    assert isinstance(out, Weather) and out.model_dump() == value


# ---------- bad input: OpenAI-shaped 4xx, never 5xx, nothing forwarded ----------


@pytest.mark.parametrize("extra,param_start", [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, None),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, None),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_malformed_tool_shapes_are_a_400(ladder: Ladder, extra: dict[str, Any], param_start: str | None) -> None:
    before = len(ladder.up.requests)
    r = httpx.post(f"{ladder.url}/chat/completions", json={"model": CASCADE, "messages": ASK, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param_start is not None:
        assert (err["param"] or "").startswith(param_start), err
    assert len(ladder.up.requests) == before


def test_images_on_a_text_only_ladder_are_a_400_naming_the_capability() -> None:
    app = create_app(Settings(), tiers=[Tier("small", ScriptedBackend("small"), None)])
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    with serve_app(app) as url:
        for body, param, need in [({"messages": image}, "messages", "images"),
                                  ({"messages": ASK, "tools": [WEATHER_TOOL]}, "tools", "tools"),
                                  ({"messages": ASK, "n": 3}, "n", "n")]:
            for stream in (False, True):
                r = httpx.post(f"{url}/chat/completions", json={"model": CASCADE, **body, "stream": stream},
                               timeout=30)
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert (err["code"], err["param"]) == ("unsupported_capability", param)
                assert f"small lacks {need}" in err["message"]


def test_capabilities_are_configurable_per_tier() -> None:
    from localroute.backends.capabilities import capabilities_for

    settings = Settings(tiers=[{"name": "s", "kind": "llama_cpp", "model": "smollm2-135m",
                                "capabilities": {"tools": True, "context_tokens": 512}},
                               {"name": "f", "kind": "openai", "model": "m", "base_url": "http://x"}])
    small, frontier = (capabilities_for(t, 2048) for t in settings.ladder())
    assert small.tools and not small.images and small.context_tokens == 512
    assert small.missing(frozenset({"tools", "images"})) == "images"
    assert frontier.missing(frozenset({"tools", "images", "n", "logit_bias"})) is None


@pytest.mark.slow
def test_a_prompt_too_long_for_the_local_context_goes_to_the_frontier() -> None:
    """The real SmolLM2 tier (n_ctx 1024) under a frontier: a ~1,500-token prompt is the frontier's,
    the skip in the evidence; the same prompt to the local tier alone stays a 400."""
    from tests.conftest import local_settings

    scripted = completion({"role": "assistant", "content": "A long text about words."})
    with FaultUpstream() as up:
        up.script(Fault(completion=scripted))
        settings = local_settings(tiers=[
            {"name": "smollm2", "kind": "llama_cpp", "model": "smollm2-135m"},
            {"name": "frontier", "kind": "openai", "model": UPSTREAM_MODEL, "base_url": up.url}])
        long = [{"role": "user", "content": "word " * 1500 + "Summarise."}]
        with serve_app(create_app(settings)) as url:
            r = httpx.post(f"{url}/chat/completions", json={"model": CASCADE, "messages": long}, timeout=120)
            alone = httpx.post(f"{url}/chat/completions", json={"model": "smollm2", "messages": long}, timeout=120)
        assert r.status_code == 200, r.text
        assert up.requests[0]["json"] == {"model": UPSTREAM_MODEL, "messages": long}
    answer = r.json()
    assert answer["choices"] == scripted["choices"] and r.headers["x-localroute-tier"] == "frontier"
    assert answer["localroute"]["evidence"]["skipped"] == {"smollm2": "context_length"}
    assert alone.status_code == 400 and alone.json()["error"]["code"] == "context_length_exceeded"
