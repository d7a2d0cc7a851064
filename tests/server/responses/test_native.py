"""A remote tier that speaks the Responses API natively (`responses_api = true`), end to end: the
official openai client's `responses.create` body reaches it as sent (model replaced, localroute's
metadata keys removed, `store: false`, a `previous_response_id` resolved by localroute into the
items it stands for), and its Response, or its stream, comes back as it sent it but for
localroute's id, model, store fields and routing block. A chat-only tier on the same app still
gets the translated chat body. The app is built from settings as `localroute serve` builds it;
both upstreams are real recording HTTP servers on 127.0.0.1 (tests/fault_upstream.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from localroute.server import create_app
from tests.conftest import local_settings, serve_app
from tests.fault_upstream import Fault, FaultUpstream

KEY = "sk-local-test"
UPSTREAM_KEY = "sk-upstream-responses"
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}}
USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 9,
         "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 29}


def response(*output: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A Response as the provider returns one."""
    return {"id": "resp_upstream", "object": "response", "created_at": 1764750000, "status": status,
            "background": False, "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": None, "model": "gpt-test-2025-01-01", "output": list(output),
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": "low", "summary": None}, "service_tier": "default", "store": False,
            "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
            "tools": [], "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled", "usage": USAGE, "user": None,
            "metadata": {}}


REASONING = {"id": "rs_up", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Look it up."}]}


def text_item(text: str) -> dict[str, Any]:
    return {"id": "msg_up", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


CALL = {"id": "fc_up", "type": "function_call", "status": "completed", "call_id": "call_up1", "name": "get_weather",
        "arguments": '{"city":"Paris"}'}


def text_events(*pieces: str) -> list[dict[str, Any]]:
    """A streamed Response with a reasoning summary and a text message, as the provider sends it."""
    text = "".join(pieces)
    running = {**response(), "status": "in_progress", "output": [], "usage": None}
    done = response(REASONING, text_item(text))
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": running},
        {"type": "response.in_progress", "response": running},
        {"type": "response.output_item.added", "output_index": 0, "item": {**REASONING, "summary": []}},
        {"type": "response.reasoning_summary_part.added", "item_id": "rs_up", "output_index": 0, "summary_index": 0,
         "part": {"type": "summary_text", "text": ""}},
        {"type": "response.reasoning_summary_text.delta", "item_id": "rs_up", "output_index": 0, "summary_index": 0,
         "delta": "Look it up."},
        {"type": "response.reasoning_summary_text.done", "item_id": "rs_up", "output_index": 0, "summary_index": 0,
         "text": "Look it up."},
        {"type": "response.reasoning_summary_part.done", "item_id": "rs_up", "output_index": 0, "summary_index": 0,
         "part": {"type": "summary_text", "text": "Look it up."}},
        {"type": "response.output_item.done", "output_index": 0, "item": REASONING},
        {"type": "response.output_item.added", "output_index": 1,
         "item": {**text_item(""), "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", "item_id": "msg_up", "output_index": 1, "content_index": 0,
         "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}},
        *({"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 1, "content_index": 0,
           "delta": p, "logprobs": []} for p in pieces),
        {"type": "response.output_text.done", "item_id": "msg_up", "output_index": 1, "content_index": 0,
         "text": text, "logprobs": []},
        {"type": "response.content_part.done", "item_id": "msg_up", "output_index": 1, "content_index": 0,
         "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}},
        {"type": "response.output_item.done", "output_index": 1, "item": text_item(text)},
        {"type": "response.completed", "response": done},
    ]
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def call_events() -> list[dict[str, Any]]:
    """A streamed function call."""
    running = {**response(), "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": running},
        {"type": "response.in_progress", "response": running},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**CALL, "status": "in_progress", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_up", "output_index": 0, "delta": '{"city":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_up", "output_index": 0, "delta": '"Paris"}'},
        {"type": "response.function_call_arguments.done", "item_id": "fc_up", "output_index": 0,
         "arguments": CALL["arguments"]},
        {"type": "response.output_item.done", "output_index": 0, "item": CALL},
        {"type": "response.completed", "response": response(CALL)},
    ]
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.fixture
def stack() -> Iterator[tuple[OpenAI, FaultUpstream, FaultUpstream, str]]:
    with FaultUpstream() as native, FaultUpstream(Fault(text="Chat tier answer.")) as chat:
        settings = local_settings(api_keys=KEY, tiers=[
            {"name": "chat", "kind": "openai", "model": "chat-model", "base_url": chat.url, "api_key": "sk-chat"},
            {"name": "gpt", "kind": "openai", "model": "gpt-test", "base_url": native.url, "api_key": UPSTREAM_KEY,
             "responses_api": True}])
        with serve_app(create_app(settings)) as url:
            yield OpenAI(base_url=url, api_key=KEY, max_retries=0), native, chat, url


def test_a_responses_request_is_passed_through_and_its_response_returned_as_sent(stack: Any) -> None:
    client, native, chat, _ = stack
    answer = response(REASONING, text_item("Let me check."), CALL)
    native.script(Fault(completion=answer))
    request = {"model": "gpt", "instructions": "Use tools.", "input": "Weather in Paris?", "tools": [WEATHER],
               "tool_choice": "auto", "reasoning": {"effort": "low", "summary": "auto"}, "include":
               ["reasoning.encrypted_content"], "max_output_tokens": 300, "metadata": {"trace": "t-1"}}
    raw = client.responses.with_raw_response.create(
        **request, extra_body={"metadata": {"trace": "t-1", "localroute_category": "weather"}})
    got = native.requests[-1]
    assert got["path"] == "/v1/responses" and got["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # as sent: model replaced, localroute's category key taken out, store false (localroute keeps it)
    assert got["json"] == {**request, "model": "gpt-test", "store": False}
    assert chat.requests == []
    assert raw.headers["x-localroute-tier"] == "gpt" and raw.headers["x-localroute-category"] == "weather"
    body = json.loads(raw.http_response.content)
    routing = body.pop("localroute")
    assert routing["tier"] == "gpt"
    assert body["id"].startswith("resp_") and body["id"] != answer["id"]
    assert body == {**answer, "id": body["id"], "model": "gpt", "store": True, "previous_response_id": None}
    parsed = raw.parse()
    assert [item.type for item in parsed.output] == ["reasoning", "message", "function_call"]
    assert parsed.output[2].call_id == "call_up1"
    assert parsed.usage is not None and parsed.usage.output_tokens_details.reasoning_tokens == 3
    assert client.responses.retrieve(parsed.id).model_dump(exclude_none=True)["output"] == \
        parsed.model_dump(exclude_none=True)["output"]  # stored in localroute's store


def test_a_chat_only_tier_still_gets_the_translated_body(stack: Any) -> None:
    client, native, chat, _ = stack
    out = client.responses.create(model="chat", instructions="Be brief.", input="Capital of France?")
    assert chat.requests[-1]["path"] == "/v1/chat/completions"
    assert chat.requests[-1]["json"] == {"model": "chat-model", "logprobs": True, "messages": [  # non-final: judged
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]}
    assert out.output_text == "Chat tier answer." and native.requests == []


def test_a_two_turn_tool_loop_keeps_the_conversation_in_localroute(stack: Any) -> None:
    client, native, _, _ = stack
    native.script(Fault(completion=response(CALL)), Fault(completion=response(text_item("18C and sunny."))))
    first = client.responses.create(model="gpt", input="Weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    second = client.responses.create(model="gpt", previous_response_id=first.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 18}'}])
    assert second.output_text == "18C and sunny." and second.previous_response_id == first.id
    # turn 2 as the tier got it: the stored turns as items, as sent, before the client's own; no localroute id
    assert native.requests[-1]["json"] == {"model": "gpt-test", "tools": [WEATHER], "store": False, "input": [
        {"type": "message", "role": "user", "content": "Weather in Paris?"}, CALL,
        {"type": "function_call_output", "call_id": "call_up1", "output": '{"temp_c": 18}'}]}

    # the same loop without stored state: the client sends the items itself, passed on as sent
    native.script(Fault(completion=response(text_item("Still 18C."))))
    items: Any = [{"role": "user", "content": "Weather in Paris?"},
                  {"type": "function_call", "call_id": "call_up1", "name": "get_weather",
                   "arguments": '{"city":"Paris"}'},
                  {"type": "function_call_output", "call_id": "call_up1", "output": '{"temp_c": 18}'}]
    third = client.responses.create(model="gpt", input=items, tools=[WEATHER], store=False)
    assert native.requests[-1]["json"] == {"model": "gpt-test", "input": items, "tools": [WEATHER], "store": False}
    assert third.output_text == "Still 18C." and third.store is False
    with pytest.raises(openai.NotFoundError):  # store: false: localroute kept nothing
        client.responses.retrieve(third.id)


def test_a_reasoning_tool_loop_sends_the_output_back_as_is(stack: Any) -> None:
    """The stateless loop OpenAI documents for reasoning models (`input += response.output`): the
    reasoning item and a hosted tool go only to the Responses tier, as the client sent them."""
    client, native, chat, _ = stack
    tools: Any = [{"type": "web_search"}, WEATHER]
    reasoning = {**REASONING, "encrypted_content": "gAAAAB-opaque"}  # include reasoning.encrypted_content
    native.script(Fault(completion=response(reasoning, text_item("Let me check."), CALL)),
                  Fault(completion=response(text_item("18C."))))
    first = client.responses.create(model="localroute/cascade", input="Weather in Paris?", tools=tools,
                                    include=["reasoning.encrypted_content"])
    items: Any = [{"role": "user", "content": "Weather in Paris?"}, *first.output,
                  {"type": "function_call_output", "call_id": "call_up1", "output": "18C"}]
    second = client.responses.create(model="localroute/cascade", input=items, tools=tools)
    assert second.output_text == "18C." and chat.requests == []  # the chat tier cannot read them: skipped
    assert native.requests[-1]["json"] == {"model": "gpt-test", "tools": tools, "store": False, "input": [
        {"role": "user", "content": "Weather in Paris?"}, reasoning, text_item("Let me check."), CALL,
        {"type": "function_call_output", "call_id": "call_up1", "output": "18C"}]}
    assert second.model_extra is not None
    assert second.model_extra["localroute"]["evidence"]["skipped"] == {"chat": "responses_api"}


def test_a_streamed_response_is_the_upstream_stream_event_for_event(stack: Any) -> None:
    client, native, _, url = stack
    request = {"model": "gpt", "input": "Capital of France?", "reasoning": {"effort": "low", "summary": "auto"}}
    native.script(Fault(events=text_events("Par", "is.")))
    r = httpx.post(f"{url}/responses", headers={"authorization": f"Bearer {KEY}"}, json={**request, "stream": True},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert native.requests[-1]["json"] == {**request, "model": "gpt-test", "stream": True, "store": False}
    got = sse(r.text)
    sent = text_events("Par", "is.")
    assert [name for name, _ in got] == [e["type"] for e in sent]
    ours = got[0][1]["response"]["id"]
    assert ours.startswith("resp_") and ours != "resp_upstream"
    routing = got[-1][1]["response"].pop("localroute")
    assert routing["tier"] == "gpt" and r.headers["x-localroute-tier"] == "gpt"
    for event in sent:  # each Response in them: localroute's id, model and store fields
        if "response" in event:
            event["response"].update(id=ours, model="gpt", store=True, previous_response_id=None)
    assert [data for _, data in got] == sent

    native.script(Fault(events=text_events("Par", "is.")))  # the official client reads it as OpenAI's own
    events = list(client.responses.create(**request, stream=True))
    assert [e.type for e in events] == [e["type"] for e in sent]
    final = events[-1].response
    assert final.output_text == "Paris." and final.usage is not None and final.usage.input_tokens == 20
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == "Paris." and [i.type for i in stored.output] == ["reasoning", "message"]


def test_a_streamed_function_call_and_its_follow_up(stack: Any) -> None:
    client, native, _, _ = stack
    native.script(Fault(events=call_events()))
    with client.responses.stream(model="gpt", input="Weather in Paris?", tools=[WEATHER]) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_response()
    assert kinds == [e["type"] for e in call_events()]
    call = first.output[0]
    assert call.type == "function_call" and call.arguments == '{"city":"Paris"}'
    native.script(Fault(events=text_events("18C.")))
    with client.responses.stream(model="gpt", previous_response_id=first.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}]) as stream:
        second = stream.get_final_response()
    assert second.output_text == "18C."
    assert native.requests[-1]["json"]["input"] == [
        {"type": "message", "role": "user", "content": "Weather in Paris?"}, CALL,
        {"type": "function_call_output", "call_id": "call_up1", "output": "18C"}]


def test_bad_input_and_upstream_errors_are_responses_shaped_4xx(stack: Any) -> None:
    client, native, _, url = stack
    with pytest.raises(openai.BadRequestError) as err:  # an id localroute never issued: 400, nothing sent
        client.responses.create(model="gpt", input="hi", previous_response_id="resp_nope")
    assert err.value.code == "previous_response_not_found" and native.requests == []
    r = httpx.post(f"{url}/responses", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "gpt", "input": "hi", "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus" and native.requests == []
    native.script(Fault("status", status=400, body=json.dumps(
        {"error": {"message": "Invalid value for 'reasoning.effort'.", "type": "invalid_request_error",
                   "param": "reasoning.effort", "code": "invalid_value"}})))
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="gpt", input="hi", reasoning={"effort": "low"})
    assert "reasoning.effort" in str(err.value) and UPSTREAM_KEY not in str(err.value.body)
    # an error event after the first output: the stream ends Responses-style, numbered after the tier's events
    native.script(Fault(events=[*text_events("Par")[:5],
                                {"type": "error", "code": "server_error", "message": "boom", "param": None,
                                 "sequence_number": 5}]))
    r = httpx.post(f"{url}/responses", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "gpt", "input": "hi", "stream": True}, timeout=30)
    got = sse(r.text)
    assert [name for name, _ in got][-2:] == ["error", "response.failed"]
    assert [name for name, _ in got][:5] == [e["type"] for e in text_events("Par")[:5]]
    assert got[-2][1]["sequence_number"] == 5 and got[-1][1]["response"]["status"] == "failed"


def scored_item(text: str) -> dict[str, Any]:
    """A message whose text came with token logprobs (three alternatives each)."""
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in (("Par", -0.01), ("Lon", -5.0),
                                                                               ("Rom", -6.0))]
    return {**text_item(text), "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": [
        {"token": text, "logprob": -0.01, "bytes": list(text.encode()), "top_logprobs": top}]}]}


def test_a_non_final_responses_tier_is_judged_on_the_logprobs_it_is_asked_for() -> None:
    """A non-final tier is judged on its logprobs: a Responses tier's call asks for them as a chat
    tier's does (else its confidence is unknown, and every answer is paid for, then escalated),
    and the client gets the Response as it asked for it."""
    with FaultUpstream() as native, FaultUpstream(Fault(text="Chat tier answer.")) as chat:
        settings = local_settings(api_keys=KEY, tiers=[
            {"name": "gpt", "kind": "openai", "model": "gpt-test", "base_url": native.url, "api_key": UPSTREAM_KEY,
             "responses_api": True},
            {"name": "chat", "kind": "openai", "model": "chat-model", "base_url": chat.url, "api_key": "sk-chat"}])
        with serve_app(create_app(settings)) as url:
            client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
            native.script(Fault(completion={**response(scored_item("Paris.")), "top_logprobs": 5}))
            raw = client.responses.with_raw_response.create(model="localroute/cascade", input="Capital of France?")
            sent = native.requests[-1]["json"]
            assert sent["include"] == ["message.output_text.logprobs"]  # as the chat tier is asked for `logprobs`
            assert raw.headers["x-localroute-tier"] == "gpt" and chat.requests == []  # judged and accepted
            body = json.loads(raw.http_response.content)
            assert body["localroute"]["attempts"][0]["confidence"] is not None
            assert body["output"][0]["content"][0]["logprobs"] == [] and body["top_logprobs"] == 0  # not asked

            native.script(Fault(completion={**response(scored_item("Paris.")), "top_logprobs": 5}))
            out = client.responses.create(model="localroute/cascade", input="Capital of France?", top_logprobs=1,
                                          include=["message.output_text.logprobs"])
            assert native.requests[-1]["json"]["include"] == ["message.output_text.logprobs"]
            logprobs = out.output[0].content[0].logprobs  # type: ignore[union-attr]
            assert logprobs is not None and [len(t.top_logprobs) for t in logprobs] == [1] and out.top_logprobs == 1


def test_a_reasoning_item_without_its_encrypted_content_is_not_sent_to_a_tier_that_stores_nothing(stack: Any) -> None:
    """The tier is sent `store: false`, so it has no copy of an earlier reasoning item: one sent back
    by id alone (no `encrypted_content`) is a 404 at OpenAI ("Items are not persisted when `store`
    is set to false"). It is left out of the tier's input; the rest goes as sent."""
    client, native, _, _ = stack
    native.script(Fault(completion=response(REASONING, CALL)), Fault(completion=response(text_item("18C."))))
    first = client.responses.create(model="gpt", input="Weather in Paris?", tools=[WEATHER])
    items: Any = [{"role": "user", "content": "Weather in Paris?"}, *first.output,
                  {"type": "function_call_output", "call_id": "call_up1", "output": "18C"}]
    second = client.responses.create(model="gpt", input=items, tools=[WEATHER])
    assert second.output_text == "18C."
    assert native.requests[-1]["json"]["input"] == [
        {"role": "user", "content": "Weather in Paris?"}, CALL,
        {"type": "function_call_output", "call_id": "call_up1", "output": "18C"}]
    # reasoning text as an open-weight server (vLLM, gpt-oss) returns it: it carries itself, kept
    own = {**REASONING, "content": [{"type": "reasoning_text", "text": "Look it up."}]}
    native.script(Fault(completion=response(text_item("18C."))))
    client.responses.create(model="gpt", input=[items[0], own, *items[-2:]], tools=[WEATHER])
    assert native.requests[-1]["json"]["input"] == [items[0], own, CALL, items[-1]]


def test_a_hosted_tool_call_sent_back_goes_to_the_responses_tier_as_sent(stack: Any) -> None:
    """`input += response.output` with a hosted tool: its call item (web_search_call) is the need
    responses_api, like the tool itself, not a 400; a chat-only route names the need."""
    client, native, chat, _ = stack
    search = {"id": "ws_up", "type": "web_search_call", "status": "completed",
              "action": {"type": "search", "query": "weather Paris"}}
    tools: Any = [{"type": "web_search"}]
    native.script(Fault(completion=response(search, text_item("18C in Paris."))),
                  Fault(completion=response(text_item("Yes, 18C."))))
    first = client.responses.create(model="localroute/cascade", input="Weather in Paris?", tools=tools)
    assert [item.type for item in first.output] == ["web_search_call", "message"]
    items: Any = [{"role": "user", "content": "Weather in Paris?"}, *first.output,
                  {"role": "user", "content": "Sure?"}]
    second = client.responses.create(model="localroute/cascade", input=items, tools=tools)
    assert second.output_text == "Yes, 18C." and chat.requests == []
    assert native.requests[-1]["json"]["input"] == [
        {"role": "user", "content": "Weather in Paris?"}, search, text_item("18C in Paris."),
        {"role": "user", "content": "Sure?"}]
    with pytest.raises(openai.BadRequestError) as err:  # the chat tier alone cannot read it
        client.responses.create(model="chat", input=[search, {"role": "user", "content": "Sure?"}])
    assert err.value.code == "unsupported_capability"


def test_the_400_for_an_api_only_need_says_which_tier_serves_it(stack: Any) -> None:
    """No `capabilities` override can give a tier a Responses-only or Messages-only need: the 400
    names the tier that serves it, not a setting that does not exist."""
    import anthropic

    client, _, _, url = stack
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="chat", input="Weather in Paris?", tools=[{"type": "web_search"}])
    message = str(err.value)
    assert err.value.code == "unsupported_capability" and "chat lacks responses_api" in message
    assert "kind=openai tier with responses_api = true" in message and "tiers.<name>.capabilities" not in message
    messages = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as aerr:
        messages.messages.create(model="chat", max_tokens=50, thinking={"type": "enabled", "budget_tokens": 1024},
                                 messages=[{"role": "user", "content": "hi"}])
    assert "thinking: only a kind=anthropic tier serves it" in str(aerr.value)
    assert "tiers.<name>.capabilities" not in str(aerr.value)
    from localroute.backends.capabilities import configure_hint

    assert configure_hint(["tools", "thinking"]) == (  # both kinds of need: both pieces of advice
        "configure a tier with these capabilities (tiers.<name>.capabilities) or a frontier tier; "
        "thinking: only a kind=anthropic tier serves it")


def test_a_tool_choice_for_hosted_tools_alone_goes_to_the_responses_tier(stack: Any) -> None:
    """`tools=[web_search]` with `tool_choice="required"` (or "auto"): the choice is the hosted
    tools', which the chat body leaves out, not a 400 "tool_choice needs tools"."""
    client, native, chat, _ = stack
    for choice in ("required", "auto"):
        native.script(Fault(completion=response(text_item("Searched."))))
        out = client.responses.create(model="localroute/cascade", input="News?", tools=[{"type": "web_search"}],
                                      tool_choice=choice)  # type: ignore[arg-type]
        assert out.output_text == "Searched." and chat.requests == []
        assert native.requests[-1]["json"] == {"model": "gpt-test", "input": "News?", "store": False,
                                               "tools": [{"type": "web_search"}], "tool_choice": choice}
    with pytest.raises(openai.BadRequestError):  # a function choice with no such function is still a 400
        client.responses.create(model="gpt", input="News?", tools=[{"type": "web_search"}],
                                tool_choice={"type": "function", "name": "get_weather"})


SEARCH = {"id": "ws_up", "type": "web_search_call", "status": "completed",
          "action": {"type": "search", "query": "capital of France"}}
CITATION = {"type": "url_citation", "url": "https://example.com/fr", "title": "France", "start_index": 0,
            "end_index": 5}


def test_a_buffered_response_streams_every_output_item_it_has() -> None:
    """A non-final Responses tier is called buffered (its answer is judged whole); a client that
    streams still gets every output item the tier sent (reasoning with its summary, a hosted
    tool's call, the message with its annotations), as the events that tier would have streamed,
    and the terminal event carries the Response as sent."""
    with FaultUpstream() as native, FaultUpstream(Fault(text="Chat tier answer.")) as chat:
        settings = local_settings(api_keys=KEY, tiers=[
            {"name": "gpt", "kind": "openai", "model": "gpt-test", "base_url": native.url, "api_key": UPSTREAM_KEY,
             "responses_api": True},
            {"name": "chat", "kind": "openai", "model": "chat-model", "base_url": chat.url, "api_key": "sk-chat"}])
        message = scored_item("Paris.")
        message["content"][0]["annotations"] = [CITATION]
        answer = {**response(REASONING, SEARCH, message), "top_logprobs": 5}
        request: Any = {"model": "localroute/cascade", "input": "Capital of France?"}  # the chat tier may answer
        with serve_app(create_app(settings)) as url:
            native.script(Fault(completion=answer))
            r = httpx.post(f"{url}/responses", headers={"authorization": f"Bearer {KEY}"},
                           json={**request, "stream": True}, timeout=30)
            assert r.status_code == 200, r.text
            assert "stream" not in native.requests[-1]["json"] and chat.requests == []  # buffered, accepted
            got = sse(r.text)
            names = [name for name, _ in got]
            assert names == [
                "response.created", "response.in_progress",
                "response.output_item.added", "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done", "response.output_item.done",
                "response.output_item.added", "response.output_item.done",  # the web search call
                "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                "response.output_text.annotation.added", "response.output_text.done", "response.content_part.done",
                "response.output_item.done", "response.completed"]
            assert [data["sequence_number"] for _, data in got] == list(range(len(got)))
            done = got[-1][1]["response"]
            assert done["localroute"]["tier"] == "gpt" and done["id"].startswith("resp_")
            sent_output = [REASONING, SEARCH, {**message, "content": [{**message["content"][0], "logprobs": []}]}]
            assert done["output"] == sent_output  # as sent (logprobs the client did not ask for taken out)
            assert [data["item"] for name, data in got if name == "response.output_item.done"] == sent_output

            native.script(Fault(completion=answer))  # the official client's stream helper rebuilds it
            client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
            with client.responses.stream(**request) as stream:
                kinds = [event.type for event in stream]
                final = stream.get_final_response()
            assert kinds == names
            assert [item.type for item in final.output] == ["reasoning", "web_search_call", "message"]
            assert final.output_text == "Paris." and final.model == "localroute/cascade"
            assert final.output[2].content[0].annotations[0].url == CITATION["url"]  # type: ignore[union-attr,index]
            stored = client.responses.retrieve(final.id)
            assert [item.type for item in stored.output] == ["reasoning", "web_search_call", "message"]


# ---- stored turns and item references ----


def test_stored_turns_keep_every_output_item_as_sent(stack: Any) -> None:
    """previous_response_id sends the Responses tier every item of the stored turns as it was
    sent (reasoning, a hosted tool's call, the message); a chat tier continuing the same
    conversation reads what chat carries of it (the messages), the rest neither refused nor
    keeping it off the chat tier."""
    client, native, chat, _ = stack
    reasoning = {**REASONING, "encrypted_content": "gAAAAB-opaque"}
    tools: Any = [{"type": "web_search"}]
    native.script(Fault(completion=response(reasoning, SEARCH, text_item("18C in Paris."))),
                  Fault(completion=response(text_item("Yes, 18C."))))
    first = client.responses.create(model="gpt", input="Weather in Paris?", tools=tools,
                                    include=["reasoning.encrypted_content"])
    second = client.responses.create(model="gpt", previous_response_id=first.id, input="Sure?", tools=tools)
    assert second.output_text == "Yes, 18C."
    assert native.requests[-1]["json"] == {"model": "gpt-test", "tools": tools, "store": False, "input": [
        {"type": "message", "role": "user", "content": "Weather in Paris?"}, reasoning, SEARCH,
        text_item("18C in Paris."), {"role": "user", "content": "Sure?"}]}
    third = client.responses.create(model="chat", previous_response_id=second.id, input="Thanks.")
    assert third.output_text == "Chat tier answer."
    assert chat.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "18C in Paris."},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, 18C."},
        {"role": "user", "content": "Thanks."}]


def test_an_item_reference_is_resolved_against_the_store(stack: Any) -> None:
    client, native, chat, _ = stack
    first = client.responses.create(model="chat", input="Capital of France?")
    items: Any = [{"type": "item_reference", "id": first.output[0].id}, {"role": "user", "content": "Sure?"}]
    client.responses.create(model="chat", input=items)  # no previous_response_id: found by its own id
    assert chat.requests[-1]["json"]["messages"] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Chat tier answer."}]},
        {"role": "user", "content": "Sure?"}]

    # items the Responses tier named: found in the conversation previous_response_id names, `type` optional
    native.script(Fault(completion=response(SEARCH, text_item("18C in Paris."))),
                  Fault(completion=response(text_item("Yes."))))
    tools: Any = [{"type": "web_search"}]
    turn = client.responses.create(model="gpt", input="Weather in Paris?", tools=tools)
    refs: Any = [{"type": "item_reference", "id": "ws_up"}, {"id": "msg_up"}, {"role": "user", "content": "Sure?"}]
    client.responses.create(model="gpt", previous_response_id=turn.id, input=refs, tools=tools)
    assert native.requests[-1]["json"]["input"][-3:] == [SEARCH, text_item("18C in Paris."),
                                                        {"role": "user", "content": "Sure?"}]

    sent = len(chat.requests) + len(native.requests)
    for missing in ("msg_nope", "ws_up"):  # never stored; stored only in a conversation not named
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="chat", input=[{"type": "item_reference", "id": missing}])
        assert err.value.code == "item_not_found" and missing in err.value.message
        assert err.value.param == "input.0.id"
    assert len(chat.requests) + len(native.requests) == sent


def test_a_conversation_stored_as_chat_messages_still_continues() -> None:
    """A row stored before conversations were kept as items holds chat messages: a later turn
    still continues it, on a chat tier as those messages and on the Responses tier as items."""
    with FaultUpstream() as native, FaultUpstream(Fault(text="Chat tier answer.")) as chat:
        settings = local_settings(api_keys=KEY, tiers=[
            {"name": "chat", "kind": "openai", "model": "chat-model", "base_url": chat.url, "api_key": "sk-chat"},
            {"name": "gpt", "kind": "openai", "model": "gpt-test", "base_url": native.url, "api_key": UPSTREAM_KEY,
             "responses_api": True}])
        app = create_app(settings)
        with serve_app(app) as url:
            legacy = [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "call_up1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                      {"role": "tool", "tool_call_id": "call_up1", "content": "18C"},
                      {"role": "assistant", "content": "18C in Paris."}]
            app.state.service.responses.put("resp_legacy", response(text_item("18C in Paris.")), legacy)
            client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
            client.responses.create(model="chat", previous_response_id="resp_legacy", input="Sure?")
            assert chat.requests[-1]["json"]["messages"] == [*legacy, {"role": "user", "content": "Sure?"}]
            native.script(Fault(completion=response(text_item("Yes."))))
            client.responses.create(model="gpt", previous_response_id="resp_legacy", input="Sure?")
            assert native.requests[-1]["json"]["input"] == [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": "call_up1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_up1", "output": "18C"},
                {"role": "assistant", "content": "18C in Paris."}, {"role": "user", "content": "Sure?"}]
