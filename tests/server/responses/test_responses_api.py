"""/v1/responses end to end: the official openai client against localroute on 127.0.0.1, a
scripted local tier and a real recording OpenAI-compatible upstream as the frontier; the exact chat
body forwarded and the exact Response returned, streamed and not, stored and continued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.routing.base import Tier
from localroute.server import create_app
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream

KEY = "sk-local-test"
TEXT = "The frontier answers: Paris."
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}}


def _stack(**settings: Any) -> Any:
    local = ScriptedBackend("local", text="Local answer here", logprobs=-0.05)
    up = FaultUpstream(Fault(text=TEXT))
    up.__enter__()
    frontier = OpenAIHTTPBackend("frontier", up.url, "frontier-model", api_key="sk-upstream")
    app = create_app(local_settings(api_keys=KEY, **settings),
                     tiers=[Tier("local", local, -1.0), Tier("frontier", frontier)])
    return app, up, local


@pytest.fixture
def stack() -> Iterator[tuple[OpenAI, FaultUpstream, ScriptedBackend, str]]:
    app, up, local = _stack()
    try:
        with serve_app(app) as url:
            yield OpenAI(base_url=url, api_key=KEY, max_retries=0), up, local, url
    finally:
        up.__exit__()


def test_create_through_the_frontier_forwards_the_translated_body(stack: Any) -> None:
    client, up, _, _ = stack
    raw = client.responses.with_raw_response.create(
        model="frontier", instructions="Be brief.", max_output_tokens=40, temperature=0.3, top_p=0.8,
        input=[{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Hmm."},
               {"role": "user", "content": [{"type": "input_text", "text": "Answer now."}]}])
    assert up.requests[-1]["path"] == "/v1/chat/completions"
    assert up.requests[-1]["json"] == {  # the translated chat body, model replaced
        "model": "frontier-model", "max_completion_tokens": 40, "temperature": 0.3, "top_p": 0.8,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Hmm."},
                     {"role": "user", "content": [{"type": "text", "text": "Answer now."}]}]}
    assert raw.headers["x-localroute-tier"] == "frontier"
    response = raw.parse()
    assert response.output_text == TEXT and response.status == "completed" and response.model == "frontier"
    assert response.id.startswith("resp_") and response.instructions == "Be brief."
    body = json.loads(raw.http_response.content)
    assert body["output"] == [{"type": "message", "id": body["output"][0]["id"], "status": "completed",
                               "role": "assistant", "content": [{"type": "output_text", "text": TEXT,
                                                                 "annotations": []}]}]
    assert body["usage"] == {"input_tokens": 27, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 31}
    assert body["localroute"]["tier"] == "frontier" and body["store"] is True


def test_a_confident_local_tier_answers(stack: Any) -> None:
    client, up, _, _ = stack
    raw = client.responses.with_raw_response.create(model="localroute/cascade", input="hi")
    assert raw.headers["x-localroute-tier"] == "local" and raw.headers["x-localroute-escalated"] == "false"
    assert raw.parse().output_text == "Local answer here" and up.requests == []
    cut = client.responses.create(model="local", input="hi", max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


def test_logprobs_and_json_schema_are_carried(stack: Any) -> None:
    client, up, _, _ = stack
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    response = client.responses.create(model="frontier", input="x", include=["message.output_text.logprobs"],
                                       top_logprobs=2, text={"format": {"type": "json_schema", "name": "s",
                                                                        "schema": schema}})
    sent = up.requests[-1]["json"]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs is not None and [lp.token for lp in part.logprobs] == ["The", " frontier", " answers:",
                                                                               " Paris."]


def test_stream_is_the_responses_event_sequence(stack: Any) -> None:
    client, up, _, _ = stack
    events = list(client.responses.create(model="frontier", input="Capital?", stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[4:-4] == ["response.output_text.delta"] * 4
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == TEXT and done.usage is not None and done.usage.output_tokens == 4
    assert up.requests[-1]["json"]["stream"] is True
    with client.responses.stream(model="local", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Local answer here"


def test_store_retrieve_and_previous_response_id(stack: Any) -> None:
    client, up, _, _ = stack
    first = client.responses.create(model="frontier", instructions="Only once.", input="My name is Ada.")
    assert client.responses.retrieve(first.id).output_text == TEXT
    second = client.responses.create(model="frontier", previous_response_id=first.id, input="My name?")
    assert second.previous_response_id == first.id
    assert up.requests[-1]["json"]["messages"] == [  # instructions are not carried over
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": TEXT},
        {"role": "user", "content": "My name?"}]
    streamed = list(client.responses.create(model="frontier", previous_response_id=second.id, input="Again?",
                                            stream=True))
    third_id = streamed[-1].response.id  # type: ignore[union-attr]
    assert client.responses.retrieve(third_id).output_text == TEXT
    client.responses.create(model="frontier", previous_response_id=third_id, input="Last.")
    assert len(up.requests[-1]["json"]["messages"]) == 7
    unstored = client.responses.create(model="frontier", input="x", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="frontier", previous_response_id="resp_missing", input="x")
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_without_a_store_previous_response_id_is_a_400() -> None:
    app, up, _ = _stack(routing_log_path=None)
    try:
        with serve_app(app) as url:
            client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
            assert client.responses.create(model="local", input="x").store is False
            for extra in ({"previous_response_id": "resp_1"}, {"store": True}):
                with pytest.raises(openai.BadRequestError) as err:
                    client.responses.create(model="local", input="x", **extra)  # type: ignore[call-overload]
                assert err.value.code == "store_disabled"
                assert "routing_log_path or routing_log_url" in err.value.message  # either engine
            with pytest.raises(openai.BadRequestError) as err:  # an item reference: nothing to find it in
                client.responses.create(model="local", input=[{"type": "item_reference", "id": "msg_1"}])
            assert err.value.code == "store_disabled" and err.value.param == "input.0.id"
            assert "'msg_1'" in err.value.message and "routing_log_path or routing_log_url" in err.value.message
    finally:
        up.__exit__()


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x"}, "model"),
    ({"model": "local"}, "input"),
    ({"model": "local", "input": "x", "temperature": 3}, "temperature"),
    ({"model": "local", "input": "x", "bogus": 1}, "bogus"),
    ({"model": "local", "input": "x", "tools": [{"name": "f"}]}, "tools.0.type"),
    ({"model": "local", "input": [{"type": "reasoning", "summary": []}]}, "input.0.id"),
    ({"model": "local", "input": "x", "background": True}, "background"),
    ({"model": "local", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     "input.0.content.0.text"),
])
def test_bad_input_is_an_openai_shaped_400(stack: Any, body: dict[str, Any], param: str) -> None:
    _, _, _, url = stack
    r = httpx.post(url + "/responses", headers={"authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]


@pytest.mark.parametrize("kind", [{"a": 1}, [1], 3, None])
def test_an_item_type_that_is_not_a_string_is_a_400(stack: Any, kind: Any) -> None:
    """Found by schemathesis: {"type": {...}} made the item-kind lookup raise (a 500)."""
    _, _, _, url = stack
    r = httpx.post(url + "/responses", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "local", "input": [{"type": kind, "role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra", [
    {"include": ["reasoning.encrypted_content"]}, {"reasoning": {"summary": "auto"}}, {"truncation": "auto"},
    {"tools": [{"type": "web_search"}]},
    {"input": [{"type": "reasoning", "id": "rs_1", "summary": []}, {"role": "user", "content": "x"}]}])
def test_a_responses_only_field_no_tier_serves_is_a_400_naming_the_capability(stack: Any,
                                                                              extra: dict[str, Any]) -> None:
    _, up, local, url = stack  # a local and a chat-only frontier tier: neither speaks the Responses API
    r = httpx.post(url + "/responses", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "localroute/cascade", "input": "x", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_capability"
    assert "local lacks responses_api" in err["message"] and "frontier lacks responses_api" in err["message"]
    assert up.requests == [] and local.calls == 0


def test_upstream_failure_mid_request_is_a_5xx_and_midstream_an_error_event(stack: Any) -> None:
    client, up, _, _ = stack
    up.script(Fault("cut", cut_after=2))
    events = list(client.responses.create(model="frontier", input="x", stream=True))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.error is not None  # type: ignore[union-attr]
    up.script(*[Fault("status", status=500)] * 3)
    with pytest.raises(openai.APIStatusError) as err:
        client.responses.create(model="frontier", input="x")
    assert err.value.status_code == 502 and err.value.body["type"] == "upstream_error"  # type: ignore[index]


TOOL_ANSWER = {"id": "chatcmpl-tool", "object": "chat.completion", "created": 1, "model": "frontier-model",
               "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                   "role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                          "function": {"name": "get_weather",
                                                                                       "arguments": '{"city":"Paris"}'}}]}}],
               "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}


def test_two_turn_tool_loop_through_the_frontier(stack: Any) -> None:
    client, up, _, _ = stack
    up.script(Fault("status", status=200, body=json.dumps(TOOL_ANSWER)))
    first = client.responses.create(model="frontier", input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice="required")
    call = first.output[0]
    assert call.type == "function_call" and call.call_id == "call_1" and call.arguments == '{"city":"Paris"}'
    assert up.requests[-1]["json"]["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["parameters"],
        "strict": True}}]
    assert up.requests[-1]["json"]["tool_choice"] == "required"
    second = client.responses.create(model="frontier", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"}])
    assert second.output_text == TEXT
    assert up.requests[-1]["json"]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": TOOL_ANSWER["choices"][0]["message"]["tool_calls"]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    third = client.responses.create(model="frontier", previous_response_id=first.id, tools=[WEATHER],
                                    input=[{"type": "function_call_output", "call_id": "call_1", "output": "18C"}])
    assert third.output_text == TEXT and up.requests[-1]["json"]["messages"][1:] == up.requests[-2]["json"][
        "messages"][1:]


def test_routing_log_and_metrics_see_both_apis() -> None:
    """A Responses and a Messages request are rows of the routing log (labelled by their API, under
    the chat request id whose suffix the answer's id carries) and count in the metrics."""
    import sqlite3

    app, up, _ = _stack()
    try:
        with serve_app(app) as url:
            client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
            response = client.responses.create(model="localroute/cascade", input="hi")
            r = httpx.post(url + "/messages", headers={"x-api-key": KEY}, json={
                "model": "localroute/cascade", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            httpx.post(url + "/messages", headers={"x-api-key": KEY}, json={"model": "x"})  # refused: a row too
            metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers={"x-api-key": KEY}).text
            svc = app.state.service
            svc.monitoring.routing_log.flush()
            path = svc.settings.routing_log_path
    finally:
        up.__exit__()
    assert 'localroute_requests_total{outcome="ok",policy="localroute/cascade",tier="local"} 2.0' in metrics
    rows = sqlite3.connect(path).execute("SELECT request_id, endpoint, policy, tier, status FROM requests").fetchall()
    suffixes = {response.id.removeprefix("resp_"), r.json()["id"].removeprefix("msg_")}
    assert {row[0].split("-", 1)[1] for row in rows if row[2] != "rejected"} == suffixes
    assert sorted((row[1], row[2], row[4]) for row in rows) == [
        ("messages", "localroute/cascade", 200), ("messages", "rejected", 400), ("responses", "localroute/cascade", 200)]


def test_an_image_goes_to_the_image_capable_tier(stack: Any) -> None:
    client, up, local, _ = stack
    raw = client.responses.with_raw_response.create(model="localroute/cascade", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}]}])
    assert raw.headers["x-localroute-tier"] == "frontier" and local.calls == 0
    assert up.requests[-1]["json"]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]}]
    assert raw.parse().output_text == TEXT


def test_streamed_function_call(stack: Any) -> None:
    from tests.server.tool_stream_chunks import TOOL_CALL_CHUNKS

    client, up, _, _ = stack
    up.script(Fault(chunks=TOOL_CALL_CHUNKS))
    events = list(client.responses.create(model="frontier", input="Weather in Paris?", tools=[WEATHER], stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = events[-1].response  # type: ignore[union-attr]
    call = final.output[0]
    assert call.type == "function_call" and call.call_id == "call_1" and call.arguments == '{"city":"Paris"}'
    assert final.usage is not None and final.usage.output_tokens == 8
    # the stored conversation continues from the call: its output goes back by previous_response_id
    client.responses.create(model="frontier", previous_response_id=final.id, tools=[WEATHER],
                            input=[{"type": "function_call_output", "call_id": "call_1", "output": "18C"}])
    assert up.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]



def test_a_store_that_fails_on_sqlite_keeps_the_answer_and_says_so_streamed_or_not() -> None:
    """The answer is computed and paid for before it is stored: a non-streamed one comes back with
    store false and x-localroute-store-error; a stream has already sent response.completed, so an
    error event after it says the response was not stored (never a connection closed mid-stream)."""
    import sqlite3

    app, up, _ = _stack()
    try:
        with serve_app(app) as url:
            client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
            client.responses.create(model="frontier", input="warm")  # the store is open and migrated
            with sqlite3.connect(app.state.service.settings.routing_log_path) as conn:
                conn.execute("DROP TABLE responses")  # every put now fails with sqlite3.OperationalError
            plain = httpx.post(url + "/responses", headers={"authorization": f"Bearer {KEY}"},
                               json={"model": "frontier", "input": "x"}, timeout=30)
            events = list(client.responses.create(model="frontier", input="y", stream=True))
            metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers={"x-api-key": KEY}).text
    finally:
        up.__exit__()
    assert plain.status_code == 200, plain.text
    assert plain.json()["store"] is False and plain.json()["output"][0]["content"][0]["text"] == TEXT
    assert plain.headers["x-localroute-store-error"] == "OperationalError"
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["response.completed", "error"] and "response.failed" not in kinds, kinds
    assert events[-1].code == "store_failed"  # type: ignore[union-attr]
    assert 'localroute_response_store_failures_total{reason="OperationalError"} 2.0' in metrics
