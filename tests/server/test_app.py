"""The server started for real (uvicorn on 127.0.0.1) with the real SmolLM2 tier, driven by the
official openai client."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from localroute.server import create_app
from tests.conftest import local_settings, serve_app

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    settings = local_settings(tiers=[{"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}])
    with serve_app(create_app(settings)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def test_models_lists_policy_and_tiers(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["localroute/cascade", "smollm2-135m"]


def test_chat_completion_says_how_it_was_routed(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="localroute/cascade", messages=MSG, max_tokens=12, temperature=0)
    assert raw.headers["x-localroute-tier"] == "smollm2-135m"
    assert raw.headers["x-localroute-escalated"] == "false"
    float(raw.headers["x-localroute-confidence"])
    body = raw.parse()
    assert body.object == "chat.completion" and body.id.startswith("chatcmpl-")
    assert body.choices[0].message.content and body.choices[0].finish_reason in ("stop", "length")
    assert body.usage.prompt_tokens > 0 and 0 < body.usage.completion_tokens <= 12
    info = body.model_extra["localroute"]
    assert info["tier"] == "smollm2-135m" and info["escalated"] is False
    assert info["attempts"][0]["completion_tokens"] == body.usage.completion_tokens


def test_max_completion_tokens_is_honoured(client: OpenAI) -> None:
    body = client.chat.completions.create(model="smollm2-135m", messages=MSG, max_completion_tokens=3, temperature=0)
    assert body.usage.completion_tokens == 3 and body.choices[0].finish_reason == "length"


def test_logprobs_and_top_logprobs(client: OpenAI) -> None:
    body = client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = body.choices[0].logprobs.content
    assert len(content) == body.usage.completion_tokens
    assert "".join(t.token for t in content) == body.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
    conf = body.model_extra["localroute"]["confidence"]
    assert conf == pytest.approx(sum(t.logprob for t in content) / len(content), abs=1e-6)


def test_stream_matches_non_stream_and_reports_usage(client: OpenAI) -> None:
    whole = client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}, logprobs=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    # the routing block rides on the very last chunk (here the usage chunk, which also carries the cost)
    assert chunks[-1].model_extra["localroute"]["tier"] == "smollm2-135m"
    assert chunks[-1].usage.model_extra["cost"] == chunks[-1].model_extra["localroute"]["cost_usd"]
    assert any(c.choices and c.choices[0].logprobs for c in chunks)


def test_stream_headers_name_the_tier(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/chat/completions", json={
        "model": "localroute/cascade", "messages": MSG, "max_tokens": 4, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-localroute-tier"] == "smollm2-135m"
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"


def test_completions_endpoint_with_logprobs(client: OpenAI) -> None:
    body = client.completions.create(model="smollm2-135m", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = body.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == body.choices[0].text and all(len(d) == 2 for d in lp.top_logprobs)


def test_content_as_list_of_parts(client: OpenAI) -> None:
    body = client.chat.completions.create(
        model="smollm2-135m", max_tokens=3, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}])
    assert body.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "exc", "param"),
    [
        ({"model": "nope"}, openai.NotFoundError, "model"),
        ({"n": 129}, openai.BadRequestError, "n"),  # above OpenAI's bound (n > 1 itself is served locally)
        ({"temperature": 3}, openai.BadRequestError, "temperature"),
        ({"top_logprobs": 3}, openai.BadRequestError, "top_logprobs"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"messages": []}, openai.BadRequestError, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ],
)
def test_client_mistakes_are_openai_shaped_4xx(client: OpenAI, kwargs: dict, exc: type, param: str) -> None:
    args = {"model": "smollm2-135m", "messages": MSG, "max_tokens": 2, **kwargs}
    with pytest.raises(exc) as info:
        client.chat.completions.create(**args)
    err = info.value.body
    assert set(err) >= {"message", "type", "param", "code"} and param in (err["param"] or "")


def test_prompt_beyond_context_is_400_context_length_exceeded(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m", max_tokens=2,
                                       messages=[{"role": "user", "content": "word " * 2000}])
    assert info.value.code == "context_length_exceeded"


def test_invalid_json_is_400_not_422(base_url: str) -> None:
    r = httpx.post(f"{base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{base_url}/chat/completions", json=[1, 2])
    assert r.status_code == 400 and "error" in r.json()


def test_concurrent_requests_all_answer_identically(client: OpenAI) -> None:
    def ask(_: int) -> str:
        return client.chat.completions.create(model="smollm2-135m", messages=MSG, max_tokens=8,
                                              temperature=0).choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(set(answers)) == 1 and answers[0]


def test_health(base_url: str) -> None:
    r = httpx.get(base_url.removesuffix("/v1") + "/health")
    assert r.status_code == 200 and r.json()["tiers"]["smollm2-135m"]["ok"] is True


def test_startup_heap_is_frozen_while_serving(base_url: str) -> None:
    """The server's and the engine child's start-up objects sit in the collector's permanent
    generation (server/app.py freeze_startup_heap): oldest-generation passes skip them."""
    assert gc.get_freeze_count() > 0  # this process runs the server
    health = httpx.get(base_url.removesuffix("/v1") + "/health").json()
    assert health["tiers"]["smollm2-135m"]["engine_process"]["gc_frozen"] > 0


def test_shutdown_unfreezes_the_heap() -> None:
    gc.unfreeze()
    settings = local_settings(tiers=[{"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}],
                              engine_isolation="thread")
    with serve_app(create_app(settings)):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_answer_json_takes_what_the_stdlib_took() -> None:
    """Answers are encoded by orjson; what it refuses (a frontier's lone surrogate, a huge int)
    falls back to the standard encoder instead of failing the request."""
    import json

    import numpy as np

    from localroute.server.http import dumps

    for value in ({"text": "ok \u00e9", "lp": np.float32(-0.5), 3: "int key"}, {"text": "bad \ud800 half"},
                  {"n": 2**70}, {"lp": float("-inf")}):
        out = json.loads(dumps(value))
        assert isinstance(out, dict) and len(out) == len(value)
    assert json.loads(dumps({"text": "bad \ud800 half"}))["text"] == "bad \ud800 half"


def test_an_answer_that_fails_to_build_is_still_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Observers run after the answer is sent; if building the answer fails after the engines
    worked, the request is still recorded (as a 500), never lost."""
    from localroute.monitoring.record import RequestRecord
    from localroute.routing.base import Tier
    from localroute.server import serving
    from tests.fakes import ScriptedBackend

    records: list[RequestRecord] = []
    tiers = [Tier("small", ScriptedBackend("small", "an answer", [-0.1, -0.2]), None)]
    with serve_app(create_app(local_settings(), tiers=tiers, observers=[records.append])) as url:
        ok = httpx.post(f"{url}/chat/completions", json={"model": "small", "messages": MSG})
        assert ok.status_code == 200 and [r.status_code for r in records] == [200]

        def broken(*args: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(serving, "routing_info", broken)
        bad = httpx.post(f"{url}/chat/completions", json={"model": "small", "messages": MSG})
    assert bad.status_code == 500
    assert [(r.status_code, r.error) for r in records] == [(200, None), (500, "internal_error")]
    assert records[1].generation is not None and records[1].generation.text == "an answer"
