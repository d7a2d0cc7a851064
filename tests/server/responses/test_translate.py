"""Responses <-> chat translation: round trips on requests built from openai-python's own
Responses types (checked against them), every SDK field carried or refused, answers and streams."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from openai.types.responses import response_create_params as rcp
from pydantic import TypeAdapter

from localroute.errors import InvalidRequestError
from localroute.server.responses.protocol import ResponsesRequest
from localroute.server.responses.translate_answer import ResponsesStream, response_from_chat
from localroute.server.responses.translate_request import LOGPROBS_INCLUDE, from_chat, to_chat

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER,
        "strict": True}

CORPUS: list[rcp.ResponseCreateParamsNonStreaming] = [
    rcp.ResponseCreateParamsNonStreaming(model="m", input="Hi"),
    rcp.ResponseCreateParamsNonStreaming(
        model="m", instructions="Be brief.", max_output_tokens=50, temperature=0.5, top_p=0.9,
        metadata={"k": "v"}, user="u", safety_identifier="s", prompt_cache_key="p", prompt_cache_retention="24h",
        service_tier="flex", parallel_tool_calls=False, stream=False,
        input=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "developer", "content": [{"type": "input_text", "text": "dev note"}]},
               {"role": "user", "content": [
                   {"type": "input_text", "text": "what is this?"},
                   {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"},
                   {"type": "input_file", "file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"}]}]),
    rcp.ResponseCreateParamsNonStreaming(
        model="m", tools=[TOOL, {"type": "function", "name": "noop", "parameters": None, "strict": None}],
        tool_choice={"type": "function", "name": "get_weather"},
        input=[{"role": "user", "content": "Weather in Paris and Rome?"},
               {"role": "assistant", "content": "Looking."},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
               {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
               {"type": "function_call_output", "call_id": "call_2",
                "output": [{"type": "input_text", "text": "20C"}]},
               {"role": "user", "content": "So?"}]),
    rcp.ResponseCreateParamsNonStreaming(
        model="m", tools=[TOOL], tool_choice={"type": "allowed_tools", "mode": "required",
                                              "tools": [{"type": "function", "name": "get_weather"}]},
        input=[{"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "c", "output": "ok"}]),
    rcp.ResponseCreateParamsNonStreaming(
        model="m", input="x", tool_choice="required", tools=[TOOL], top_logprobs=3,
        include=["message.output_text.logprobs"], reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True,
                         "description": "d"}, "verbosity": "low"}),
    rcp.ResponseCreateParamsNonStreaming(model="m", input="x", text={"format": {"type": "json_object"}}),
    rcp.ResponseCreateParamsNonStreaming(model="m", input="x", text={"format": {"type": "text"}}, tool_choice="none"),
    {"model": "m", "input": "x", "stream": True, "stream_options": {"include_obfuscation": False}},
]


@pytest.mark.parametrize("body", CORPUS)
def test_round_trip(body: dict[str, Any]) -> None:
    # what the server reads (serving.read_body) is what the client sent
    assert ResponsesRequest.model_validate(body).model_dump(by_alias=True, exclude_unset=True) == body
    original = copy.deepcopy(body)
    chat = to_chat(body)
    assert body == original
    back = from_chat(chat)
    if isinstance(body["input"], str):  # a string input is one user message
        assert back.pop("input") == [{"role": "user", "content": body["input"]}]
        body = {k: v for k, v in body.items() if k != "input"}
    assert back == body


def test_corpus_matches_the_sdk_types() -> None:
    adapter = TypeAdapter(rcp.ResponseCreateParamsNonStreaming)
    for body in CORPUS:
        adapter.validate_python({k: v for k, v in body.items() if k not in ("stream", "stream_options")})


def test_output_items_sent_back_keep_only_what_changes_the_answer() -> None:
    body = {"model": "m", "input": [
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "status": "completed", "call_id": "call_1", "name": "f",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "r", "id": "fco_1", "status": "completed"},
        {"type": "message", "id": "msg_2", "status": "completed", "role": "assistant",
         "content": [{"type": "refusal", "refusal": "no"}]}]}
    TypeAdapter(rcp.ResponseCreateParamsNonStreaming).validate_python(body)
    ResponsesRequest.model_validate(body)
    assert to_chat(body)["messages"] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Hi"}], "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "r"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]


def test_the_chat_body_is_what_a_chat_tier_reads() -> None:
    chat = to_chat(CORPUS[4])
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER, "strict": True}}]
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "w", "description": "d", "schema": WEATHER, "strict": True}}
    assert chat["logprobs"] is True and chat["top_logprobs"] == 3 and chat["reasoning_effort"] == "low"
    msgs = to_chat(CORPUS[1])["messages"]
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[4]["content"][1] == {"type": "image_url", "image_url": {"url": "https://example.com/cat.png",
                                                                        "detail": "low"}}
    assert to_chat(CORPUS[1])["max_completion_tokens"] == 50
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "answer"}]
    assert to_chat({"model": "m", "input": "next", "instructions": "I"}, history)["messages"] == [
        {"role": "system", "content": "I"}, *history, {"role": "user", "content": "next"}]


REFUSED: dict[str, Any] = {
    "conversation": "conv_1", "prompt": {"id": "p"}, "prompt_cache_options": {"mode": "explicit"},
    "context_management": [{"type": "compaction"}], "moderation": {"model": "m"}, "max_tool_calls": 3,
    "access_programs": ["x"], "background_options": {"x": 1}, "image": {"x": 1}, "background": True,
    "truncation": "auto",
}
SERVER_SIDE = {"store", "previous_response_id"}  # the server's (serving.py), not the chat tier's


def test_every_sdk_field_is_carried_or_refused() -> None:
    sdk = set(rcp.ResponseCreateParamsBase.__annotations__) | {"stream"}
    carried = {k for body in CORPUS for k in body}
    assert sdk - carried - set(REFUSED) - SERVER_SIDE == set()
    assert set(REFUSED) | SERVER_SIDE <= set(ResponsesRequest.model_fields)


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_fields_are_a_400_naming_them(field: str) -> None:
    body = {"model": "m", "input": "x", field: REFUSED[field]}
    ResponsesRequest.model_validate(body)
    with pytest.raises(InvalidRequestError) as err:
        to_chat(body)
    assert err.value.param == field and err.value.code == "unsupported_field"


@pytest.mark.parametrize(("body", "param"), [
    ({"include": ["reasoning.encrypted_content"]}, "include.0"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f", "detail": "auto"}]}]},
     "input.0.content.0.file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]},
     "input.0.content.0.file_url"),
    ({"input": [{"role": "assistant", "phase": "final_answer", "content": "x"}]}, "input.0.phase"),
    ({"input": [{"role": "assistant", "content": [
        {"type": "output_text", "text": "x", "annotations": [{"type": "url_citation"}]}]}]},
     "input.0.content.0.annotations"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_image", "image_url": "u", "detail": "auto"}]}]}, "input.0.output.0"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]}},
     "tool_choice.tools"),
    ({"tools": [{"type": "web_search", "search_context_size": "low"}]}, "tools.0"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}]}, "input.0"),
])
def test_untranslatable_content_is_refused(body: dict[str, Any], param: str) -> None:
    body = {"model": "m", "input": "x", **body}
    ResponsesRequest.model_validate(body)
    with pytest.raises(InvalidRequestError) as err:
        to_chat(body)
    assert err.value.param == param


def test_responses_only_fields_are_a_need_when_a_responses_tier_may_serve_them() -> None:
    """Given a needs set (the endpoint's), what only a Responses tier reads is the need
    "responses_api" and stays out of the chat body; what chat carries is translated as ever."""
    body = {"model": "m", "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "low", "summary": "auto"},
            "truncation": "auto", "tools": [{"type": "web_search"}, TOOL],
            "input": [{"type": "reasoning", "id": "rs_1", "summary": []}, {"role": "user", "content": [
                {"type": "input_text", "text": "x"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "y",
                                                    "annotations": [{"type": "url_citation"}]}]}]}
    ResponsesRequest.model_validate(body)
    needs: set[str] = set()
    chat = to_chat(body, (), needs)
    assert needs == {"responses_api"}
    assert chat == {"model": "m", "reasoning_effort": "low", "tools": [to_chat({**body, "tools": [TOOL], "input": "x",
                                                                                 "include": None, "truncation": None,
                                                                                 "reasoning": None})["tools"][0]],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "y"}]}]}
    plain: set[str] = set()
    to_chat({"model": "m", "input": "x", "tools": [TOOL]}, (), plain)
    assert plain == set()


@pytest.mark.parametrize("bad", [
    {"tools": [{"name": "f"}]},
    {"input": [{"type": "reasoning", "summary": []}]},
    {"unknown_field": 1},
    {"input": [{"type": "item_reference"}]},
    {"input": [{"type": "item_reference", "id": ""}]},
    {"input": [{"id": "x", "extra": 1}]},
])
def test_what_the_wire_model_refuses(bad: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"model": "m", "input": "x", **bad})


def test_an_item_reference_is_read_but_never_translated_unresolved() -> None:
    """The server resolves item references against its store before translating (serving.py):
    one that reaches the translation is a 400 naming it, not an item dropped."""
    for item in ({"type": "item_reference", "id": "msg_1"}, {"id": "msg_1"}):
        body = ResponsesRequest.model_validate({"model": "m", "input": [item]}).model_dump(
            by_alias=True, exclude_unset=True)
        assert body["input"] == [item]
        with pytest.raises(InvalidRequestError) as err:
            to_chat(body, (), set())
        assert err.value.param == "input.0"


LOGPROBS = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                         "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]}], "refusal": None}


def _answer(message: dict[str, Any], finish: str = "stop", logprobs: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "choices": [{"index": 0, "message": {"role": "assistant", **message},
                                               "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
            "localroute": {"tier": "local"}}


def test_answers() -> None:
    body = {"model": "m", "input": "x", "instructions": "I", "tools": [TOOL], "include": [LOGPROBS_INCLUDE]}
    out = response_from_chat(_answer({"content": "Hi"}, logprobs=LOGPROBS), body, "resp_1", 5.0)
    assert out["id"] == "resp_1" and out["object"] == "response" and out["status"] == "completed"
    assert out["output"] == [{"type": "message", "id": "msg_abc", "status": "completed", "role": "assistant",
                              "content": [{"type": "output_text", "text": "Hi", "annotations": [], "logprobs": [
                                  {"token": "Hi", "bytes": [72, 105], "logprob": -0.1, "top_logprobs": [
                                      {"token": "Hi", "bytes": [72, 105], "logprob": -0.1}]}]}]}]
    assert out["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13}
    assert out["instructions"] == "I" and out["tools"] == [TOOL] and out["localroute"] == {"tier": "local"}
    calls = response_from_chat(_answer({"content": None, "tool_calls": [{"id": "call_9", "type": "function",
                                                                          "function": {"name": "get_weather",
                                                                                       "arguments": "{}"}}]},
                                       "tool_calls"), body, "resp_2", 5.0)
    assert calls["output"] == [{"type": "function_call", "id": "fc_abc_0", "call_id": "call_9",
                                "name": "get_weather", "arguments": "{}", "status": "completed"}]
    cut = response_from_chat(_answer({"content": "H"}, "length"), body, "resp_3", 5.0)
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    unasked = response_from_chat(_answer({"content": "Hi"}, logprobs=LOGPROBS), {"model": "m", "input": "x"}, "r", 5.0)
    assert "logprobs" not in unasked["output"][0]["content"][0]  # a tier's logprobs, not asked for


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": extra.pop("logprobs", None)}]
    return {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "choices": choices, **extra}


def _run(stream: ResponsesStream, chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return stream.start() + [e for c in chunks for e in stream.feed(c)] + stream.finish()


def test_stream_text_then_tool_call_ends_with_the_non_streamed_response() -> None:
    body = {"model": "m", "input": "x", "tools": [TOOL]}
    chunks = [
        _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hi"}), _chunk({"content": "!"}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Paris"}'}}]}),
        _chunk({}, "tool_calls", localroute={"tier": "frontier"}),
        _chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}),
    ]
    s = ResponsesStream(body, "resp_1", 5.0, "chatcmpl-abc")
    events = _run(s, chunks)
    assert [n for n, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[4][1] == {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_abc",
                            "output_index": 0, "content_index": 0, "delta": "Hi", "logprobs": []}
    assert events[9][1]["output_index"] == 1 and events[9][1]["item"]["call_id"] == "call_9"
    expected = response_from_chat(_answer({"content": "Hi!", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        "tool_calls"), body, "resp_1", 5.0)
    expected["localroute"] = {"tier": "frontier"}
    assert events[-1][1]["response"] == expected == s.response
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []


def test_stream_logprobs_and_length() -> None:
    s = ResponsesStream({"model": "m", "input": "x", "top_logprobs": 1}, "resp_1", 5.0, "chatcmpl-abc")
    events = _run(s, [_chunk({"content": "Hi"}, logprobs=LOGPROBS), _chunk({}, "length")])
    assert events[4][1]["logprobs"][0]["token"] == "Hi"
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["output"][0]["content"][0]["logprobs"][0]["logprob"] == -0.1


def test_stream_error() -> None:
    s = ResponsesStream({"model": "m", "input": "x"}, "resp_1", 5.0, "chatcmpl-abc")
    events = _run(s, [_chunk({"content": "Hi"}), {"error": {"message": "down", "type": "upstream_error",
                                                             "code": "upstream_unavailable"}}])
    assert [n for n, _ in events][-2:] == ["error", "response.failed"]
    assert events[-2][1]["code"] == "upstream_unavailable" and events[-2][1]["message"] == "down"
    assert events[-1][1]["response"]["error"] == {"code": "upstream_unavailable", "message": "down"}
