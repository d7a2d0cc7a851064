"""/v1/messages and /v1/messages/count_tokens end to end: the official anthropic client against
localroute on 127.0.0.1, a scripted local tier and a real recording OpenAI-compatible upstream as
the frontier; the exact chat body forwarded and the exact Messages answer returned."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.routing.base import Tier
from localroute.server import create_app
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream

KEY = "sk-local-test"
TEXT = "The frontier answers: Paris."


@pytest.fixture
def stack() -> Iterator[tuple[anthropic.Anthropic, FaultUpstream, ScriptedBackend, str]]:
    local = ScriptedBackend("local", text="Local answer here", logprobs=-0.05)
    with FaultUpstream(Fault(text=TEXT)) as up:
        frontier = OpenAIHTTPBackend("frontier", up.url, "frontier-model", api_key="sk-upstream")
        app = create_app(local_settings(api_keys=KEY), tiers=[Tier("local", local, -1.0), Tier("frontier", frontier)])
        with serve_app(app) as url:
            root = url.removesuffix("/v1")
            yield anthropic.Anthropic(base_url=root, api_key=KEY, max_retries=0), up, local, root


def test_create_through_the_frontier_forwards_the_translated_body(stack: Any) -> None:
    client, up, _, _ = stack
    raw = client.messages.with_raw_response.create(
        model="frontier", max_tokens=50, system="Be brief.", stop_sequences=["END"],
        messages=[{"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Let me think."},
                  {"role": "user", "content": [{"type": "text", "text": "Answer now."}]}],
        extra_body={"temperature": 0.5, "top_p": 0.9})
    assert up.requests[-1]["path"] == "/v1/chat/completions"
    assert up.requests[-1]["headers"]["authorization"] == "Bearer sk-upstream"
    assert up.requests[-1]["json"] == {  # the translated chat body, model replaced
        "model": "frontier-model", "max_completion_tokens": 50, "temperature": 0.5, "top_p": 0.9,
        "stop": ["END"], "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Let me think."},
            {"role": "user", "content": [{"type": "text", "text": "Answer now."}]}]}
    assert raw.headers["x-localroute-tier"] == "frontier"
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == "frontier"
    assert message.id.startswith("msg_")
    assert [b.model_dump() for b in message.content] == [{"type": "text", "text": TEXT, "citations": None}]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    body = json.loads(raw.http_response.content)  # the usage the upstream reported (fault_upstream._usage)
    assert body["usage"] == {"input_tokens": 29, "output_tokens": 4, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0}
    assert body["localroute"]["tier"] == "frontier"


def test_a_confident_local_tier_answers_and_escalation_is_in_the_headers(stack: Any) -> None:
    client, up, local, _ = stack
    raw = client.messages.with_raw_response.create(model="localroute/cascade", max_tokens=20,
                                                   messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-localroute-tier"] == "local" and raw.headers["x-localroute-escalated"] == "false"
    assert raw.parse().content[0].text == "Local answer here" and up.requests == [] and local.calls == 1
    local.logprobs = -5.0  # below the threshold: escalates
    raw = client.messages.with_raw_response.create(model="localroute/cascade", max_tokens=20,
                                                   messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-localroute-tier"] == "frontier" and raw.headers["x-localroute-escalated"] == "true"
    assert raw.parse().content[0].text == TEXT


def test_max_tokens_cut_is_max_tokens(stack: Any) -> None:
    client, _, _, _ = stack
    message = client.messages.create(model="local", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert message.stop_reason == "max_tokens" and message.content[0].text == "Local"


def test_stream_is_the_messages_event_sequence(stack: Any) -> None:
    client, up, _, _ = stack
    with client.messages.stream(model="frontier", max_tokens=30,
                                messages=[{"role": "user", "content": "Capital?"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.content[0].text == TEXT and final.stop_reason == "end_turn" and final.usage.output_tokens == 4
    assert up.requests[-1]["json"]["stream"] is True


def test_stream_wire_events(stack: Any) -> None:
    _, _, _, root = stack
    with httpx.stream("POST", root + "/v1/messages", headers={"x-api-key": KEY}, json={
            "model": "local", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200 and r.headers["x-localroute-tier"] == "local"
        raw = r.read().decode()
    events = [block.split("\n") for block in raw.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    datas = [json.loads(e[1].removeprefix("data: ")) for e in events]
    assert [d["type"] for d in datas] == names
    assert "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta") == "Local answer here"
    assert datas[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert datas[-2]["localroute"]["tier"] == "local"


def test_count_tokens_uses_the_local_tier(stack: Any) -> None:
    client, _, local, _ = stack
    count = client.messages.count_tokens(model="localroute/cascade", messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens == local.prompt_tokens


def test_x_api_key_is_required_and_the_401_is_anthropic_shaped(stack: Any) -> None:
    _, _, _, root = stack
    r = httpx.post(root + "/v1/messages", json={"model": "local", "max_tokens": 5,
                                                "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": r.json()["error"]["message"]}}
    wrong = anthropic.Anthropic(base_url=root, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="local", max_tokens=5, messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("body", "needle"), [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "local", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "local", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "local", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "local", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"model": "local", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
     "temperature"),
    ({"model": "local", "max_tokens": 5, "bogus": 1, "messages": [{"role": "user", "content": "x"}]}, "bogus"),
    # Messages-only features no tier of the route has: a 400 naming the capability
    ({"model": "local", "max_tokens": 5, "thinking": {"type": "enabled", "budget_tokens": 2000},
      "messages": [{"role": "user", "content": "x"}]}, "local lacks thinking"),
    ({"model": "local", "max_tokens": 5, "messages": [{"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": "{"}]}, "local lacks prefill"),
    ({"model": "local", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "citations": [{"type": "char_location"}]}]}]}, "local lacks citations"),
    ({"model": "local", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "thinking"}]}]},
     "messages.0.content.0"),
])
def test_bad_input_is_an_anthropic_shaped_400(stack: Any, body: dict[str, Any], needle: str) -> None:
    _, _, _, root = stack
    r = httpx.post(root + "/v1/messages", headers={"x-api-key": KEY}, json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]


def test_unknown_model_and_bad_json(stack: Any) -> None:
    client, _, _, root = stack
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    r = httpx.post(root + "/v1/messages", headers={"x-api-key": KEY, "content-type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_upstream_failure_is_anthropic_shaped(stack: Any) -> None:
    client, up, _, _ = stack
    up.script(*[Fault("status", status=500)] * 3)
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="frontier", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and err.value.body["error"]["type"] == "api_error"  # type: ignore[index]


TOOL_ANSWER = {"id": "chatcmpl-tool", "object": "chat.completion", "created": 1, "model": "frontier-model",
               "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                   "role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                          "function": {"name": "get_weather",
                                                                                       "arguments": '{"city":"Paris"}'}}]}}],
               "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}


def test_tool_loop_through_the_frontier(stack: Any) -> None:
    client, up, _, _ = stack
    tools: Any = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    up.script(Fault("status", status=200, body=json.dumps(TOOL_ANSWER)))
    first = client.messages.create(model="frontier", max_tokens=50, tools=tools,
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert call.type == "tool_use" and call.id == "call_1" and call.input == {"city": "Paris"}
    assert up.requests[-1]["json"]["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather", "parameters": tools[0]["input_schema"]}}]
    second = client.messages.create(model="frontier", max_tokens=50, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [c.model_dump(exclude_none=True) for c in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C"}]}])
    assert second.content[0].text == TEXT
    assert up.requests[-1]["json"]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": TOOL_ANSWER["choices"][0]["message"]["tool_calls"]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]


def test_an_image_goes_to_the_image_capable_tier(stack: Any) -> None:
    client, up, local, _ = stack
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    raw = client.messages.with_raw_response.create(model="localroute/cascade", max_tokens=20, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "text", "text": "What is this?"}]}])
    assert raw.headers["x-localroute-tier"] == "frontier" and local.calls == 0  # the text-only tier is skipped
    assert up.requests[-1]["json"]["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "text", "text": "What is this?"}]}]
    assert raw.parse().content[0].text == TEXT  # type: ignore[union-attr]
    assert json.loads(raw.http_response.content)["localroute"]["evidence"]["skipped"] == {"local": "images"}


def test_streamed_tool_use(stack: Any) -> None:
    from tests.server.tool_stream_chunks import TOOL_CALL_CHUNKS

    client, up, _, _ = stack
    up.script(Fault(chunks=TOOL_CALL_CHUNKS))
    tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with client.messages.stream(model="frontier", max_tokens=50, tools=tools,
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert final.usage.output_tokens == 8 and up.requests[-1]["json"]["stream"] is True


def test_a_stream_cut_upstream_ends_with_an_error_event(stack: Any) -> None:
    client, up, _, _ = stack
    up.script(Fault("cut", cut_after=2))
    with (pytest.raises(anthropic.APIStatusError) as err,  # the SDK raises on `event: error`
          client.messages.stream(model="frontier", max_tokens=30, messages=[{"role": "user", "content": "x"}]) as stream):
        for _ in stream:
            pass
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_a_tool_call_with_non_object_arguments_is_a_502_and_its_record_says_so(stack: Any) -> None:
    client, up, _, _ = stack
    bad = json.loads(json.dumps(TOOL_ANSWER))
    bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    up.script(Fault(completion=bad))
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="frontier", max_tokens=50, messages=[{"role": "user", "content": "x"}],
                               tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    assert err.value.status_code == 502 and "not a JSON object" in err.value.message
