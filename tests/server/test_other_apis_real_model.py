"""The Responses and Messages APIs answered by the real SmolLM2 tier (llama.cpp, bundled GGUF), with
the official openai and anthropic clients: the local answer is the chat path's answer to the same
translated request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from openai import OpenAI

from localroute.server import create_app
from tests.conftest import local_settings, serve_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    settings = local_settings(tiers=[{"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}])
    with serve_app(create_app(settings)) as base:
        yield base


def _chat_answer(client: OpenAI) -> str:
    chat = client.chat.completions.create(
        model="smollm2-135m", max_completion_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What colour is the sky?"}])
    return chat.choices[0].message.content or ""


def test_responses_answered_locally(url: str) -> None:
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    raw = client.responses.with_raw_response.create(
        model="smollm2-135m", instructions="Answer in one word.", input="What colour is the sky?",
        max_output_tokens=12, temperature=0)
    assert raw.headers["x-localroute-tier"] == "smollm2-135m"
    response = raw.parse()
    assert response.output_text and response.output_text == _chat_answer(client)
    assert response.usage is not None and 0 < response.usage.output_tokens <= 12
    streamed = list(client.responses.create(model="smollm2-135m", instructions="Answer in one word.",
                                            input="What colour is the sky?", max_output_tokens=12, temperature=0,
                                            stream=True))
    assert streamed[-1].response.output_text == response.output_text  # type: ignore[union-attr]


def test_messages_answered_locally(url: str) -> None:
    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0)
    message = client.messages.create(model="smollm2-135m", max_tokens=12, system="Answer in one word.",
                                     messages=[{"role": "user", "content": "What colour is the sky?"}],
                                     extra_body={"temperature": 0})
    text = message.content[0].text  # type: ignore[union-attr]
    assert text and text == _chat_answer(OpenAI(base_url=url, api_key="unused", max_retries=0))
    with client.messages.stream(model="smollm2-135m", max_tokens=12, system="Answer in one word.",
                                messages=[{"role": "user", "content": "What colour is the sky?"}],
                                extra_body={"temperature": 0}) as stream:
        assert stream.get_final_message().content[0].text == text  # type: ignore[union-attr]
    count = client.messages.count_tokens(model="smollm2-135m", system="Answer in one word.",
                                         messages=[{"role": "user", "content": "What colour is the sky?"}])
    assert count.input_tokens == message.usage.input_tokens > 0


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                  "additionalProperties": False}


def test_responses_tool_call_answered_locally(url: str) -> None:
    """A function tool through /v1/responses on the local tier: the chat path's grammar-constrained
    call, answered as a Responses `function_call` item whose arguments validate, streamed and not."""
    import json

    import jsonschema

    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    tool: Any = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                 "parameters": WEATHER_PARAMS, "strict": True}
    raw = client.responses.with_raw_response.create(
        model="smollm2-135m", input="What is the weather in Paris?", tools=[tool], tool_choice="required",
        max_output_tokens=60, temperature=0)
    assert raw.headers["x-localroute-tier"] == "smollm2-135m"
    calls = [item for item in raw.parse().output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"], raw.parse().output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_PARAMS)
    streamed = list(client.responses.create(model="smollm2-135m", input="What is the weather in Paris?",
                                            tools=[tool], tool_choice="required", max_output_tokens=60,
                                            temperature=0, stream=True))
    final = [i for i in streamed[-1].response.output if i.type == "function_call"]  # type: ignore[union-attr]
    assert [(c.name, c.arguments) for c in final] == [(calls[0].name, calls[0].arguments)]


def test_messages_tool_use_answered_locally(url: str) -> None:
    """`tools` with `input_schema` and tool_choice any through /v1/messages on the local tier: a
    `tool_use` block whose input validates, stop_reason tool_use, streamed and not."""
    import jsonschema

    client = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0)
    tools: Any = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_PARAMS}]
    args: Any = {"model": "smollm2-135m", "max_tokens": 60, "tools": tools, "tool_choice": {"type": "any"},
                 "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                 "extra_body": {"temperature": 0}}
    message = client.messages.create(**args)
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and [u.name for u in uses] == ["get_weather"], message
    jsonschema.validate(uses[0].input, WEATHER_PARAMS)
    with client.messages.stream(**args) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(uses[0].name, uses[0].input)]
