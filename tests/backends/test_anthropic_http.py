"""The Anthropic Messages tier: chat <-> Messages translation as pure functions, then the backend
against a real recording HTTP server on 127.0.0.1 that speaks Messages (scripted answers and named
SSE events): the path, headers and exact body it receives, the answer and stream it gives back,
its errors (a 400 passed on, a 529 retried, the key never in a message)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from localroute.backends.anthropic_http import (
    ANTHROPIC_VERSION,
    AnthropicHTTPBackend,
    ChunkDecoder,
    chat_completion,
    messages_request,
)
from localroute.backends.capabilities import DEFAULTS, capabilities_for
from localroute.backends.openai_wire import NATIVE_EVENTS
from localroute.backends.resilience import Deadlines, RetryPolicy
from localroute.errors import InvalidRequestError, UpstreamError
from localroute.settings import Settings, TierSettings
from localroute.types import Generation, GenerationRequest, SamplingParams, StreamDelta, WireRequest
from tests.fault_upstream import Fault, FaultUpstream

KEY = "sk-ant-secret-key-123"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def message(*content: dict[str, Any], stop: str = "end_turn") -> dict[str, Any]:
    return {"id": "msg_upstream", "type": "message", "role": "assistant", "model": "claude-test-1",
            "content": list(content), "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 3,
                      "cache_creation_input_tokens": 0}}


def text_events(*pieces: str, stop: str = "end_turn") -> list[dict[str, Any]]:
    start = message(stop=stop)
    start.update(content=[], stop_reason=None)
    return [{"type": "message_start", "message": start}, {"type": "ping"},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in pieces),
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
             "usage": {"output_tokens": len(pieces)}},
            {"type": "message_stop"}]


THINKING = {"type": "thinking", "thinking": "The user wants the capital. It is Paris.", "signature": "sig-abc=="}
REDACTED = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}


def thinking_events() -> list[dict[str, Any]]:
    """A streamed answer as Anthropic sends one with extended thinking, ending on a stop sequence."""
    start = message(stop="stop_sequence")
    start.update(content=[], stop_reason=None)
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "The user wants "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "the capital."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig-abc=="}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": REDACTED},
        {"type": "content_block_stop", "index": 1},
        {"type": "ping"},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Paris"}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
         "usage": {"output_tokens": 31}},
        {"type": "message_stop"},
    ]


# ---- translation ----


def test_a_chat_request_becomes_a_messages_request() -> None:
    chat = {"model": "x", "max_completion_tokens": 40, "temperature": 0.2, "stop": "END", "user": "u-1",
            "seed": 7, "stream_options": {"include_usage": True}, "parallel_tool_calls": False,
            "tools": [WEATHER], "tool_choice": "required",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                                      {"type": "image_url",
                                                       "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "call_1", "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                         {"role": "user", "content": "And tomorrow?"}]}
    assert messages_request(chat, "claude-test", 256, stream=True) == {
        "model": "claude-test", "max_tokens": 40, "temperature": 0.2, "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"}, "stream": True,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        "tools": [{"name": "get_weather", "description": "Weather in a city.",
                   "input_schema": WEATHER["function"]["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "AAAA"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                                         {"type": "text", "text": "And tomorrow?"}]}]}


def test_max_tokens_defaults_and_a_json_schema_is_an_output_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = messages_request({"model": "x", "messages": [{"role": "user", "content": "hi"}],
                             "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}},
                            "m", 99, stream=False)
    assert body == {"model": "m", "max_tokens": 99, "messages": [{"role": "user", "content": "hi"}],
                    "output_config": {"format": {"type": "json_schema", "schema": schema}}}


@pytest.mark.parametrize(("field", "value"), [
    ("logprobs", True), ("n", 2), ("logit_bias", {"1": 2}), ("presence_penalty", 0.5), ("audio", {"voice": "x"}),
    ("response_format", {"type": "json_object"}), ("modalities", ["text", "audio"]), ("some_new_field", 1)])
def test_what_messages_cannot_express_is_a_400_naming_it(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as err:
        messages_request({"model": "x", "messages": [{"role": "user", "content": "hi"}], field: value}, "m", 9, False)
    assert err.value.param == field and err.value.status_code == 400


@pytest.mark.parametrize(("field", "value", "param"), [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
    ("tool_choice", {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, "tool_choice"),
    ("temperature", 1.5, "temperature"),
    ("messages", [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf,xx"}}]}],
     "messages")])
def test_odd_but_valid_chat_fields_are_a_400_not_a_crash(field: str, value: Any, param: str) -> None:
    chat = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], field: value}
    with pytest.raises(InvalidRequestError) as err:
        messages_request(chat, "m", 9, False)
    assert err.value.param == param


def test_top_p_one_is_not_sent_and_empty_turns_are_dropped() -> None:
    body = messages_request({"model": "x", "temperature": 0.5, "top_p": 1.0,
                             "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                                          {"role": "user", "content": "again"}]}, "m", 9, False)
    assert body == {"model": "m", "max_tokens": 9, "temperature": 0.5,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                              {"type": "text", "text": "again"}]}]}


def test_a_streamed_call_without_input_has_empty_object_arguments() -> None:
    decode = ChunkDecoder()
    events = [{"type": "message_start", "message": {**message(), "content": []}},
              {"type": "content_block_start", "index": 0,
               "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
              {"type": "content_block_stop", "index": 0},
              {"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "toolu_2", "name": "at", "input": {"city": "Oslo"}}},
              {"type": "content_block_stop", "index": 1}]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in map(decode, events) if c and c["choices"]
             and "tool_calls" in c["choices"][0]["delta"]]
    args = {0: "", 1: ""}
    for call in calls:
        args[call["index"]] += call["function"]["arguments"]
    assert args == {0: "{}", 1: '{"city": "Oslo"}'}


def test_a_system_message_after_the_first_turn_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as err:
        messages_request({"model": "x", "messages": [{"role": "user", "content": "hi"},
                                                     {"role": "system", "content": "late"}]}, "m", 9, False)
    assert err.value.param == "messages.1.role"


def test_an_answer_becomes_a_chat_completion() -> None:
    answer = message({"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Let me check."},
                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                     stop="tool_use")
    chat = chat_completion(answer)
    assert chat["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}]
    assert chat["usage"] == {"prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0}}
    assert chat_completion(message({"type": "text", "text": "x"}, stop="max_tokens"))["choices"][0]["finish_reason"] == "length"


def test_stream_events_become_chat_chunks() -> None:
    decode = ChunkDecoder()
    events = text_events("Hel", "lo")
    events[-2:-2] = [{"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ty": "P"}'}}]
    chunks = [c for c in map(decode, events) if c is not None]
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"},
                      {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": ""}}]},
                      {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
                      {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "P"}'}}]}, {}, None]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 15 and chunks[-1]["usage"]["completion_tokens"] == 2
    assert {c["id"] for c in chunks} == {"msg_upstream"}
    assert decode({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}) == {
        "error": {"type": "overloaded_error", "message": "busy"}}


def test_the_kind_is_configurable_and_has_no_logprobs() -> None:
    tier = TierSettings(name="claude", kind="anthropic", model="claude-test", base_url="http://x/v1")
    caps = capabilities_for(tier)
    assert caps == DEFAULTS["anthropic"] and caps.tools and caps.images and not caps.logprobs
    assert caps.missing(frozenset({"logprobs"})) == "logprobs" and caps.missing(frozenset({"n"})) == "n"
    settings = Settings(tiers=[TierSettings(name="local", model="smollm2-135m"), tier], backend="transformers")
    assert [t.kind for t in settings.ladder()] == ["transformers", "anthropic"]  # `backend` leaves remote tiers


# ---- the backend against a real server ----


def chat_req(body: dict[str, Any], native: dict[str, Any] | None = None, max_tokens: int = 64) -> GenerationRequest:
    return GenerationRequest(messages=tuple(body.get("messages", ())), params=SamplingParams(max_tokens=max_tokens),
                             wire=WireRequest("chat", body),
                             native=WireRequest("messages", native) if native is not None else None)


def _generate(url: str, request: GenerationRequest, **kw: Any) -> Generation:
    """One call of a fresh backend on `url` (its own event loop), closed after."""
    async def go() -> Generation:
        backend = AnthropicHTTPBackend("claude", url, "claude-test", api_key=KEY, **kw)
        try:
            return await backend.generate(request)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def _stream(url: str, request: GenerationRequest) -> list[StreamDelta]:
    async def go() -> list[StreamDelta]:
        backend = AnthropicHTTPBackend("claude", url, "claude-test", api_key=KEY)
        try:
            return [d async for d in backend.stream(request)]
        finally:
            await backend.aclose()

    return asyncio.run(go())


HI = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}


def test_a_native_request_is_forwarded_unchanged_and_its_answer_kept() -> None:
    native = {"model": "claude-alias", "max_tokens": 30, "system": [{"type": "text", "text": "Be brief.",
                                                                   "cache_control": {"type": "ephemeral"}}],
              "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "disabled"}, "top_k": 5}
    with_system_role = {**native, "messages": [{"role": "system", "content": "No jokes."}, *native["messages"]]}
    answer = message({"type": "text", "text": "Hello."})
    with FaultUpstream(Fault(completion=answer)) as up:
        gen = _generate(up.url, chat_req(HI, native))
    got = up.requests[-1]
    assert got["path"] == "/v1/messages"
    assert got["headers"]["x-api-key"] == KEY and got["headers"]["anthropic-version"] == ANTHROPIC_VERSION
    assert "authorization" not in got["headers"]
    assert got["json"] == {**native, "model": "claude-test"}
    assert gen.text == "Hello." and gen.extra["native"] == answer and gen.tokens == []
    assert (gen.prompt_tokens, gen.completion_tokens, gen.finish_reason) == (15, 7, "stop")
    assert gen.raw is not None and gen.raw["choices"][0]["message"]["content"] == "Hello."
    with FaultUpstream(Fault(completion=answer)) as up:  # a system-role message goes where Messages takes it
        _generate(up.url, chat_req({"model": "x", "messages": []}, with_system_role))
    assert up.requests[-1]["json"] == {**native, "model": "claude-test", "system": [
        *native["system"], {"type": "text", "text": "No jokes."}]}


def test_a_chat_request_is_translated_and_its_stream_decoded() -> None:
    with FaultUpstream(Fault(events=text_events("Par", "is."))) as up:
        deltas = _stream(up.url, chat_req({"model": "x", "messages": [{"role": "user", "content": "Capital?"}],
                                           "stream": True}, max_tokens=20))
    assert up.requests[-1]["json"] == {"model": "claude-test", "max_tokens": 20, "stream": True,
                                       "messages": [{"role": "user", "content": "Capital?"}]}
    assert "".join(d.text for d in deltas) == "Paris."
    final = deltas[-1].final
    assert final is not None and final.text == "Paris." and final.completion_tokens == 2 and final.prompt_tokens == 15
    assert [d.raw["choices"][0]["delta"] for d in deltas if d.raw and d.raw["choices"]][:2] == [
        {"role": "assistant", "content": ""}, {"content": "Par"}]


def test_errors_pass_a_400_on_retry_overload_and_never_show_the_key() -> None:
    bad = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                 "message": f"max_tokens: too large (key {KEY})"}})
    overloaded = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    retry = RetryPolicy(max_retries=1, base_delay_s=0.01)
    with FaultUpstream() as up:
        up.script(Fault("status", status=400, body=bad))
        with pytest.raises(InvalidRequestError) as err:
            _generate(up.url, chat_req(HI), retry=retry)
        assert "max_tokens: too large" in err.value.message and KEY not in err.value.message
        up.script(Fault("status", status=529, body=overloaded), Fault(completion=message({"type": "text", "text": "ok"})))
        assert _generate(up.url, chat_req(HI), retry=retry).text == "ok" and len(up.requests) == 3
        up.script(Fault("status", status=529, body=overloaded), Fault("status", status=529, body=overloaded))
        with pytest.raises(UpstreamError) as upstream:
            _generate(up.url, chat_req(HI), retry=retry)
        assert upstream.value.code == "upstream_unavailable"
        up.script(Fault(events=text_events("a", "b"), kind="cut", cut_after=4))  # no message_delta: no finish
        with pytest.raises(UpstreamError):
            _stream(up.url, chat_req(HI))


def test_a_native_stream_keeps_every_event_of_the_upstream_in_order() -> None:
    native = {"model": "claude-alias", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
              "messages": [{"role": "user", "content": "Capital?"}], "stop_sequences": ["END"]}
    with FaultUpstream(Fault(events=thinking_events())) as up:
        deltas = _stream(up.url, chat_req(HI, native))
    assert up.requests[-1]["json"] == {**native, "model": "claude-test", "stream": True}
    carried = [e for d in deltas if d.raw is not None for e in d.raw.get(NATIVE_EVENTS, ())]
    assert carried == thinking_events()  # each once, in order, as sent
    final = deltas[-1].final
    assert final is not None and final.text == "Paris" and final.completion_tokens == 31
    with FaultUpstream(Fault(events=thinking_events())) as up:  # a chat client's stream carries none
        plain = _stream(up.url, chat_req(HI))
    assert not any(NATIVE_EVENTS in d.raw for d in plain if d.raw is not None)


def test_thinking_is_output_for_the_first_token_deadline() -> None:
    """A long thinking phase before the first text is not a stalled upstream: its deltas are tokens."""
    native = {"model": "claude-alias", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
              "messages": [{"role": "user", "content": "Capital?"}]}
    events = thinking_events()
    slow = [*events[:2], *[events[2]] * 6, *events[3:]]  # 0.2 s apart: the text starts after ~2 s

    async def go() -> list[StreamDelta]:
        backend = AnthropicHTTPBackend("claude", up.url, "claude-test", api_key=KEY,
                                       deadlines=Deadlines(connect_s=1.0, first_token_s=0.8, idle_s=0.8, total_s=10.0))
        try:
            return [d async for d in backend.stream(chat_req(HI, native))]
        finally:
            await backend.aclose()

    with FaultUpstream(Fault(events=slow, token_delay_s=0.2)) as up:
        deltas = asyncio.run(go())
    final = deltas[-1].final
    assert final is not None and final.text == "Paris" and final.ttft_s is not None and final.ttft_s < 0.8
