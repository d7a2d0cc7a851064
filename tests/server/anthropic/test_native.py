"""A frontier that speaks Anthropic Messages natively, end to end: the official anthropic client's
request reaches it unchanged (but for `model`) and its answer comes back unchanged (but for
localroute's id, model and routing block); an OpenAI client's chat request reaches it translated
and its answer comes back as a chat completion; streams both ways; capability routing keeps a
logprobs request off it. The upstream is a real HTTP server on 127.0.0.1 that records every request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from localroute.backends.anthropic_http import AnthropicHTTPBackend
from localroute.routing.base import Tier
from localroute.server import create_app
from tests.backends.test_anthropic_http import REDACTED, THINKING, message, text_events, thinking_events
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream

KEY = "sk-local-test"
UPSTREAM_KEY = "sk-ant-upstream"
WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def stack() -> Iterator[tuple[str, FaultUpstream, ScriptedBackend]]:
    local = ScriptedBackend("local", text="Local answer here", logprobs=-5.0)  # below its threshold: escalates
    with FaultUpstream() as up:
        frontier = AnthropicHTTPBackend("claude", up.url, "claude-test", api_key=UPSTREAM_KEY)
        app = create_app(local_settings(api_keys=KEY), tiers=[Tier("local", local, -1.0), Tier("claude", frontier)])
        with serve_app(app) as url:
            yield url, up, local


def test_a_messages_request_is_passed_through_and_its_answer_returned_unchanged(stack: Any) -> None:
    url, up, local = stack
    answer = message({"type": "text", "text": "Let me check."},
                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                     stop="tool_use")
    up.script(Fault(completion=answer))
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    request = {"model": "localroute/cascade", "max_tokens": 50, "system": "Be brief.", "tools": [WEATHER_TOOL],
               "tool_choice": {"type": "auto"}, "stop_sequences": ["END"], "metadata": {"user_id": "u-7"},
               "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                                          "cache_control": {"type": "ephemeral"}}]}]}
    raw = client.messages.with_raw_response.create(**request)
    got = up.requests[-1]
    assert got["path"] == "/v1/messages" and got["headers"]["x-api-key"] == UPSTREAM_KEY
    assert got["json"] == {**request, "model": "claude-test"}  # exactly what the client sent
    assert raw.headers["x-localroute-tier"] == "claude"
    body = json.loads(raw.http_response.content)
    routing = body.pop("localroute")
    assert routing["tier"] == "claude"
    assert body["id"].startswith("msg_") and body["id"] != answer["id"]
    assert {**body, "id": answer["id"], "model": answer["model"]} == answer  # the provider's answer as sent
    assert body["model"] == "localroute/cascade"
    parsed = raw.parse()
    assert parsed.stop_reason == "tool_use" and parsed.content[1].input == {"city": "Paris"}
    assert local.calls == 0  # tools: the text-only local tier was skipped


def test_a_streamed_messages_request_reaches_the_tier_unchanged(stack: Any) -> None:
    url, up, local = stack
    up.script(Fault(events=text_events("Par", "is.")))
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    request = {"model": "localroute/cascade", "max_tokens": 20, "messages": [{"role": "user", "content": "Capital of France?"}],
               "stop_sequences": ["END"]}
    with client.messages.stream(**request) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert up.requests[-1]["json"] == {**request, "model": "claude-test", "stream": True}
    assert text == "Paris." and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 2 and final.usage.input_tokens == 12
    assert final.usage.cache_read_input_tokens == 3
    assert local.calls == 1  # the local tier answered first, below its threshold: escalated


def test_an_openai_client_gets_a_chat_answer_from_the_messages_tier(stack: Any) -> None:
    url, up, _ = stack
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    up.script(Fault(completion=message({"type": "tool_use", "id": "toolu_9", "name": "get_weather",
                                        "input": {"city": "Oslo"}}, stop="tool_use")))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                               "parameters": WEATHER_TOOL["input_schema"]}}]
    out = client.chat.completions.create(model="claude", max_tokens=30, tools=tools,  # type: ignore[arg-type]
                                         messages=[{"role": "system", "content": "Use tools."},
                                                   {"role": "user", "content": "Weather in Oslo?"}])
    assert up.requests[-1]["json"] == {"model": "claude-test", "max_tokens": 30, "system": "Use tools.",
                                       "tools": [WEATHER_TOOL],
                                       "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_9" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    assert out.usage is not None and out.usage.prompt_tokens == 15 and out.usage.completion_tokens == 7
    assert out.model == "claude"

    up.script(Fault(events=text_events("Hi", " there")))
    chunks = list(client.chat.completions.create(model="claude", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_a_request_the_messages_tier_cannot_serve_is_kept_off_it(stack: Any) -> None:
    url, up, _ = stack
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # logprobs: no tier of "claude"'s route gives them
        client.chat.completions.create(model="claude", logprobs=True, messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "unsupported_capability" and up.requests == []
    with pytest.raises(openai.BadRequestError) as err:  # no Messages counterpart: a 400 naming it, nothing sent
        client.chat.completions.create(model="claude", response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "unsupported_field" and "response_format" in str(err.value) and up.requests == []


def test_an_upstream_400_is_an_anthropic_shaped_400(stack: Any) -> None:
    url, up, _ = stack
    up.script(Fault("status", status=400, body=json.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "messages.0: bad block"}})))
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400 and "bad block" in str(err.value)
    assert UPSTREAM_KEY not in str(err.value.body)


# ---- thinking, stop_sequence, citations, prefill: only the Messages tier serves them ----

def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Named SSE events as (event, data) pairs."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_thinking_answer_keeps_its_blocks_and_stop_sequence(stack: Any) -> None:
    url, up, local = stack
    answer = message(THINKING, REDACTED, {"type": "text", "text": "Paris"}, stop="stop_sequence")
    answer["stop_sequence"] = "END"
    up.script(Fault(completion=answer))
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    request: Any = {"model": "localroute/cascade", "max_tokens": 2048, "stop_sequences": ["END"],
               "thinking": {"type": "enabled", "budget_tokens": 1024},
               "messages": [{"role": "user", "content": "Capital of France?"}]}
    raw = client.messages.with_raw_response.create(**request)
    assert up.requests[-1]["json"] == {**request, "model": "claude-test"}
    body = json.loads(raw.http_response.content)
    assert body.pop("localroute")["tier"] == "claude"
    assert {**body, "id": answer["id"], "model": answer["model"]} == answer
    parsed = raw.parse()
    assert [b.type for b in parsed.content] == ["thinking", "redacted_thinking", "text"]
    assert parsed.stop_reason == "stop_sequence" and parsed.stop_sequence == "END"
    assert local.calls == 0  # thinking: the chat-only local tier was skipped, never asked


def test_a_streamed_thinking_answer_is_the_upstream_stream_event_for_event(stack: Any) -> None:
    url, up, local = stack
    request: Any = {"model": "localroute/cascade", "max_tokens": 2048, "stop_sequences": ["END"],
               "thinking": {"type": "enabled", "budget_tokens": 1024},
               "messages": [{"role": "user", "content": "Capital of France?"}]}
    up.script(Fault(events=thinking_events()))
    r = httpx.post(f"{url}/messages", headers={"x-api-key": KEY}, json={**request, "stream": True}, timeout=30)
    assert r.status_code == 200, r.text
    assert up.requests[-1]["json"] == {**request, "model": "claude-test", "stream": True}
    got = sse(r.text)
    sent = thinking_events()
    assert [name for name, _ in got] == [e["type"] for e in sent]
    start = got[0][1]["message"]
    assert start["id"].startswith("msg_") and start["id"] != "msg_upstream" and start["model"] == "localroute/cascade"
    routing = got[-2][1].pop("localroute")
    assert routing["tier"] == "claude" and r.headers["x-localroute-tier"] == "claude"
    sent[0]["message"].update(id=start["id"], model="localroute/cascade")
    assert [data for _, data in got] == sent  # exactly what the upstream sent, but for id, model, routing

    up.script(Fault(events=thinking_events()))  # the official client reads it as Anthropic's own
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    with client.messages.stream(**request) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    assert [b.type for b in final.content] == ["thinking", "redacted_thinking", "text"]
    assert final.content[0].thinking == "The user wants the capital."  # type: ignore[union-attr]
    assert final.content[0].signature == "sig-abc=="  # type: ignore[union-attr]
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "END"
    assert final.usage.output_tokens == 31
    assert local.calls == 0


def test_citations_prefill_and_earlier_thinking_go_to_the_messages_tier_as_sent(stack: Any) -> None:
    url, up, local = stack
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    cited = {"type": "text", "text": "Paris is the capital.", "citations": [
        {"type": "char_location", "cited_text": "Paris", "document_index": 0, "document_title": None,
         "start_char_index": 0, "end_char_index": 5}]}
    requests: list[Any] = [
        # a prefill: the answer continues the assistant's turn
        {"model": "localroute/cascade", "max_tokens": 20,
         "messages": [{"role": "user", "content": "JSON for Paris?"}, {"role": "assistant", "content": "{"}]},
        # citations of an earlier answer, sent back
        {"model": "localroute/cascade", "max_tokens": 20,
         "messages": [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": [cited]},
                      {"role": "user", "content": "Sure?"}]},
        # a tool loop with thinking: the earlier turn's thinking goes back with its tool_use
        {"model": "localroute/cascade", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
         "tools": [WEATHER_TOOL],
         "messages": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": [THINKING, {"type": "tool_use", "id": "toolu_1",
                                                                   "name": "get_weather", "input": {"city": "Paris"}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                    "content": "18C"}]}]},
    ]
    for request in requests:
        up.script(Fault(completion=message({"type": "text", "text": '"city": "Paris"}'})))
        out = client.messages.create(**request)
        assert up.requests[-1]["json"] == {**request, "model": "claude-test"}
        assert out.content[0].text == '"city": "Paris"}'
    assert local.calls == 0  # none of them can go to the chat-only local tier


def test_a_messages_only_feature_no_tier_has_is_a_400_naming_it() -> None:
    local = ScriptedBackend("local", text="Local answer here")
    app = create_app(local_settings(api_keys=KEY), tiers=[Tier("local", local)])
    with serve_app(app) as url:
        client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as err:
            client.messages.create(model="localroute/cascade", max_tokens=50,
                                   thinking={"type": "enabled", "budget_tokens": 1024},
                                   messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "local lacks thinking" in err.value.body["error"]["message"]  # type: ignore[index]
    assert local.calls == 0


def test_an_event_after_message_delta_keeps_its_place(stack: Any) -> None:
    """The closing events are held until the end (the routing block goes on message_delta): an
    event the tier sends between them (a ping) is held behind them, not sent ahead."""
    url, up, _ = stack
    events = text_events("Hi", " there")
    events = [*events[:-1], {"type": "ping"}, events[-1]]  # message_delta, ping, message_stop
    up.script(Fault(events=events))
    r = httpx.post(f"{url}/messages", headers={"x-api-key": KEY}, timeout=30,
                   json={"model": "claude", "max_tokens": 20, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert [name for name, _ in sse(r.text)] == [e["type"] for e in events]


# ---- the client's anthropic-version and anthropic-beta headers ----

BETAS = ["interleaved-thinking-2025-05-14", "fine-grained-tool-streaming-2025-05-14"]


def test_anthropic_beta_and_version_headers_reach_the_messages_tier_as_sent(stack: Any) -> None:
    url, up, local = stack
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0,
                                 default_headers={"anthropic-version": "2023-06-01-test"})
    request: Any = {"model": "claude", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    up.script(Fault(completion=message({"type": "text", "text": "Hello"})))
    out = client.beta.messages.create(**request, betas=BETAS)
    assert out.content[0].text == "Hello"
    got = up.requests[-1]["headers"]
    assert got["anthropic-beta"] == ",".join(BETAS)  # as the SDK sent it: one line, comma-joined
    assert got["anthropic-version"] == "2023-06-01-test"  # the client's, over localroute's default
    assert got["x-api-key"] == UPSTREAM_KEY

    up.script(Fault(events=text_events("Hi", "!")))  # streamed: the same headers
    with client.beta.messages.stream(**request, betas=BETAS[:1]) as stream:
        assert "".join(stream.text_stream) == "Hi!"
    got = up.requests[-1]["headers"]
    assert got["anthropic-beta"] == BETAS[0] and got["anthropic-version"] == "2023-06-01-test"

    up.script(Fault(completion=message({"type": "text", "text": "Plain"})))  # no beta asked: none sent
    plain = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
    plain.messages.create(**request)
    got = up.requests[-1]["headers"]
    assert "anthropic-beta" not in got and got["anthropic-version"] == plain.default_headers["anthropic-version"]
    assert local.calls == 0


# ---- a buffered answer of the Messages tier, to a client that streams ----

SEARCH_USE = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "Paris weather"}}
SEARCH_RESULT = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
    {"type": "web_search_result", "url": "https://example.com/paris", "title": "Paris", "encrypted_content": "enc",
     "page_age": None}]}
CITED = {"type": "text", "text": "It is 18C.", "citations": [
    {"type": "web_search_result_location", "url": "https://example.com/paris", "title": "Paris",
     "encrypted_index": "idx", "cited_text": "18C"}]}


def _no_none(value: Any) -> Any:
    """JSON with the null fields left out, as `model_dump(exclude_none=True)` writes it."""
    if isinstance(value, dict):
        return {k: _no_none(v) for k, v in value.items() if v is not None}
    return [_no_none(v) for v in value] if isinstance(value, list) else value


def test_a_buffered_messages_answer_streams_every_block_it_has() -> None:
    """The Messages tier first on the ladder (no threshold: it answers) is called buffered, whole;
    a client that streams still gets every content block the tier sent (thinking with its
    signature, redacted thinking, a server tool's use and result, text with citations, tool_use),
    as the events that tier would have streamed, not just its text and tool calls."""
    local = ScriptedBackend("local", text="Local answer here")
    answer = message(THINKING, REDACTED, SEARCH_USE, SEARCH_RESULT, CITED,
                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                     stop="tool_use")
    with FaultUpstream() as up:
        frontier = AnthropicHTTPBackend("claude", up.url, "claude-test", api_key=UPSTREAM_KEY)
        app = create_app(local_settings(api_keys=KEY), tiers=[Tier("claude", frontier), Tier("local", local)])
        with serve_app(app) as url:
            # nothing only the Messages tier serves (thinking, tools): the chat-only local tier stays on the ladder
            request: Any = {"model": "localroute/cascade", "max_tokens": 2048,
                            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
            up.script(Fault(completion=answer))
            r = httpx.post(f"{url}/messages", headers={"x-api-key": KEY}, json={**request, "stream": True},
                           timeout=30)
            assert r.status_code == 200, r.text
            assert "stream" not in up.requests[-1]["json"]  # a buffered call
            got = sse(r.text)
            names = [name for name, _ in got]
            assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
            starts = [data["content_block"] for name, data in got if name == "content_block_start"]
            assert [b["type"] for b in starts] == [b["type"] for b in answer["content"]]
            assert got[-2][1]["localroute"]["tier"] == "claude"

            up.script(Fault(completion=answer))  # the official client's stream helper rebuilds the answer
            client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=KEY, max_retries=0)
            with client.messages.stream(**request) as stream:
                kinds = [event.type for event in stream]
                final = stream.get_final_message()
    assert {"thinking", "signature", "citation", "input_json"} <= set(kinds)
    assert final.model_dump(mode="json", exclude_none=True)["content"] == _no_none(answer["content"])
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 7
    assert final.id.startswith("msg_") and final.id != answer["id"] and final.model == "localroute/cascade"
    assert local.calls == 0
