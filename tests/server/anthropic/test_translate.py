"""Messages <-> chat translation: round trips on requests built from the anthropic SDK's own
types (checked against them), every SDK field carried or refused, answers and streams."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from anthropic.types import MessageCountTokensParams
from anthropic.types.message_create_params import MessageCreateParamsBase, MessageCreateParamsNonStreaming
from pydantic import TypeAdapter

from localroute.errors import InvalidRequestError, UpstreamError
from localroute.server.anthropic.protocol import MessagesRequest
from localroute.server.anthropic.translate import MessagesStream, from_chat, message_from_chat, to_chat

PNG = "iVBORw0KGgo="
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

CORPUS: list[MessageCreateParamsNonStreaming] = [
    MessageCreateParamsNonStreaming(model="m", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]),
    MessageCreateParamsNonStreaming(
        model="m", max_tokens=100, system="Be brief.", stop_sequences=["\n\n", "END"], temperature=0.2, top_p=0.9,
        metadata={"user_id": "u-1"}, service_tier="standard_only",
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": [{"type": "text", "text": "Again"}]}]),
    MessageCreateParamsNonStreaming(
        model="m", max_tokens=64,
        system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"},
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]),
    MessageCreateParamsNonStreaming(
        model="m", max_tokens=200, service_tier="auto",
        tools=[{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
               {"name": "noop", "input_schema": {"type": "object"}, "strict": True,
                "cache_control": {"type": "ephemeral"}}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome", "n": [1, "é"]}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "no data"}]},
                {"type": "text", "text": "Thanks, and so?"}]}]),
    MessageCreateParamsNonStreaming(
        model="m", max_tokens=10, tool_choice={"type": "tool", "name": "get_weather"},
        tools=[{"name": "get_weather", "input_schema": WEATHER}],
        messages=[{"role": "user", "content": "x"}]),
    MessageCreateParamsNonStreaming(
        model="m", max_tokens=10, tool_choice={"type": "any", "disable_parallel_tool_use": False},
        tools=[{"name": "get_weather", "input_schema": WEATHER}],
        messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": ""}]}]),
    MessageCreateParamsNonStreaming(model="m", max_tokens=10, tool_choice={"type": "none"},
                                    messages=[{"role": "user", "content": "x"}],
                                    output_config={"format": {"type": "json_schema", "schema": WEATHER}}),
    MessageCreateParamsNonStreaming(model="m", max_tokens=10, messages=[
        {"role": "user", "content": "x"}, {"role": "system", "content": "mid-conversation system"},
        {"role": "user", "content": "y"}]),
]
# fields older SDKs send and the API still takes (2.x dropped them from the types)
EXTENDED: list[dict[str, Any]] = [
    {"model": "m", "max_tokens": 5, "temperature": 1.0, "top_k": 40, "stream": True,
     "messages": [{"role": "user", "content": "x"}]},
    {"model": "m", "max_tokens": 5, "stream": False, "messages": [{"role": "user", "content": "x"}]},
]


@pytest.mark.parametrize("body", CORPUS + EXTENDED)
def test_round_trip(body: dict[str, Any]) -> None:
    # our wire model takes it, and what the server reads (serving.read_body) is what the client sent
    assert MessagesRequest.model_validate(body).model_dump(by_alias=True, exclude_unset=True) == body
    original = copy.deepcopy(body)
    chat = to_chat(body)
    assert body == original  # pure: the input is not touched
    assert from_chat(chat) == body


def test_corpus_matches_the_sdk_types() -> None:
    adapter = TypeAdapter(MessageCreateParamsNonStreaming)
    for body in CORPUS:
        adapter.validate_python(body, strict=False)


def test_the_chat_body_is_what_a_chat_tier_reads() -> None:
    chat = to_chat(CORPUS[3])
    assert chat["max_completion_tokens"] == 200 and chat["parallel_tool_calls"] is False
    assert chat["tools"][0] == {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}}
    assert chat["tool_choice"] == "auto" and chat["service_tier"] == "auto"
    msgs = chat["messages"]
    assert msgs[1]["tool_calls"][1] == {"id": "toolu_2", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Rome","n":[1,"é"]}'}}
    assert msgs[1]["content"] == [{"type": "text", "text": "Looking."}]
    assert msgs[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_2", "is_error": True,
                       "content": [{"type": "text", "text": "no data"}]}
    assert msgs[4] == {"role": "user", "content": [{"type": "text", "text": "Thanks, and so?"}]}
    image = to_chat(CORPUS[2])["messages"][1]["content"][1]
    assert image == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert to_chat(CORPUS[1])["stop"] == ["\n\n", "END"] and to_chat(CORPUS[1])["user"] == "u-1"
    assert to_chat(EXTENDED[0])["stream_options"] == {"include_usage": True}


# every top-level field of the SDK's create params: carried (in the corpus) or refused (400)
REFUSED: dict[str, Any] = {
    "cache_control": {"type": "ephemeral"}, "container": "c", "diagnostics": {"x": 1}, "inference_geo": "us",
    "speed": "fast", "thinking": {"type": "enabled", "budget_tokens": 1024}, "user_profile_id": "p",
    "workspace_id": "w",
}


def test_every_sdk_field_is_carried_or_refused() -> None:
    sdk = set(MessageCreateParamsBase.__annotations__) | set(MessageCountTokensParams.__annotations__) | {"stream"}
    carried = {k for body in CORPUS + EXTENDED for k in body}
    assert sdk - carried - set(REFUSED) == set()
    assert set(REFUSED) <= set(MessagesRequest.model_fields)


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_fields_are_a_400_naming_them(field: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], field: REFUSED[field]}
    MessagesRequest.model_validate(body)
    with pytest.raises(InvalidRequestError) as err:
        to_chat(body)
    assert err.value.param == field and err.value.code == "unsupported_field"


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "prefill {"}], "messages.1"),
    ([{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{"type": "char_location"}]}]}],
     "messages.0.content.0.citations"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"},
                                   {"type": "tool_result", "tool_use_id": "t", "content": "r"}]}],
     "messages.0.content.1"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "u"}}]}]}], "messages.0.content.0.content.0"),
    ([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}},
                                        {"type": "text", "text": "after"}]},
      {"role": "user", "content": "x"}], "messages.0.content.1"),
    ([{"role": "assistant", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]},
      {"role": "user", "content": "x"}], "messages.0.content.0"),
])
def test_untranslatable_content_is_refused(messages: list[dict[str, Any]], param: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": messages}
    MessagesRequest.model_validate(body)
    with pytest.raises(InvalidRequestError) as err:
        to_chat(body)
    assert err.value.param == param


def test_thinking_disabled_asks_for_nothing() -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "thinking": {"type": "disabled"}}
    assert "thinking" not in to_chat(body)


def _answer(message: dict[str, Any], finish: str = "stop", **usage: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, **usage},
        "localroute": {"tier": "local"}}


def test_answers() -> None:
    assert message_from_chat(_answer({"content": "Paris."}), "claude-x") == {
        "id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Paris."}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
        "localroute": {"tier": "local"}}
    calls = _answer({"content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, "tool_calls",
        prompt_tokens_details={"cached_tokens": 4})
    out = message_from_chat(calls, "m")
    assert out["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert out["stop_reason"] == "tool_use"
    assert out["usage"]["input_tokens"] == 6 and out["usage"]["cache_read_input_tokens"] == 4
    assert message_from_chat(_answer({"content": "x"}, "length"), "m")["stop_reason"] == "max_tokens"
    refusal = message_from_chat(_answer({"content": None, "refusal": "I can't."}), "m")
    assert refusal["stop_reason"] == "refusal" and refusal["content"] == [{"type": "text", "text": "I can't."}]
    with pytest.raises(UpstreamError):
        message_from_chat(_answer({"tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": "[1]"}}]}, "tool_calls"), "m")


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "choices": choices, **extra}


def test_stream_events() -> None:
    s = MessagesStream("msg_abc", "m")
    chunks = [
        _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Let me"}), _chunk({"content": " see."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk({}, "tool_calls", localroute={"tier": "frontier"}),
        _chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}),
    ]
    events = s.start() + [e for c in chunks for e in s.feed(c)] + s.finish()
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert events[8][1] == {"type": "content_block_delta", "index": 1,
                            "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}}
    assert events[10][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 9, "output_tokens": 7, "cache_creation_input_tokens": 0,
                                       "cache_read_input_tokens": 0}, "localroute": {"tier": "frontier"}}


def test_stream_error_ends_with_an_error_event() -> None:
    s = MessagesStream("msg_abc", "m")
    events = s.feed(_chunk({"content": "Hi"})) + s.feed({"error": {"message": "frontier down", "type": "x"}})
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "frontier down"}})
    assert s.finish() == []
