"""The Responses and Messages APIs answered by the real SmolLM2 tier (llama.cpp, bundled GGUF), with
the official openai and anthropic clients: the local answer is the chat path's answer to the same
translated request."""

from __future__ import annotations

from collections.abc import Iterator

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
