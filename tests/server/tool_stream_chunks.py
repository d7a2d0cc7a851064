"""A provider's streamed tool call, as OpenAI sends it (REFERENCE_APIS.md 1.5): the scripted
upstream stream the Responses and Messages stream tests translate."""

from __future__ import annotations

from typing import Any

_BASE = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "frontier-model"}


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {**_BASE, "choices": choices, **extra}


TOOL_CALL_CHUNKS = [
    _chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ':"Paris"}'}}]}),
    _chunk({}, "tool_calls"),
    _chunk(None, usage={"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}),
]
