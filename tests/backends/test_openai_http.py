"""The frontier client against a real fault-injecting HTTP upstream on 127.0.0.1: every failure
kind, deadlines, retries before the first byte only, Retry-After, the circuit breaker, aborts,
scrubbed errors; then the same faults through the server (degraded answers, 502 by policy, a cut
stream ending with an error event and no [DONE])."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from openai import OpenAI

from localroute.backends.openai_http import OpenAIHTTPBackend, scrub
from localroute.backends.resilience import CircuitBreaker, CircuitOpenError, Deadlines, RetryPolicy
from localroute.errors import InvalidRequestError, UpstreamError
from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.settings import Settings
from localroute.types import GenerationRequest, SamplingParams, StreamDelta, WireRequest
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream, fault_upstream, refused_url

KEY = "sk-canary-frontier-key-0123456789"


def make_backend(url: str, *, retries: int = 2, threshold: int = 100, reset_s: float = 30.0,
                 deadlines: Deadlines | None = None, max_total_wait_s: float = 5.0) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(
        "frontier", url, "gpt-test", api_key=KEY,
        deadlines=deadlines or Deadlines(connect_s=1.0, first_token_s=2.0, idle_s=2.0, total_s=10.0),
        retry=RetryPolicy(max_retries=retries, base_delay_s=0.01, max_total_wait_s=max_total_wait_s,
                          rng=random.Random(0)),
        breaker=CircuitBreaker("frontier", failure_threshold=threshold, reset_s=reset_s),
    )


def request(max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": "What is the capital of France?"},),
                             params=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_logprobs=1))


async def _generate(b: OpenAIHTTPBackend) -> Any:
    try:
        return await b.generate(request())
    finally:
        await b.aclose()


async def _stream(b: OpenAIHTTPBackend, pieces: list[str]) -> Any:
    final = None
    try:
        async for delta in b.stream(request()):
            if delta.final is not None:
                final = delta.final
            elif delta.text:  # the opening role chunk and the usage chunk carry no text
                pieces.append(delta.text)
        return final
    finally:
        await b.aclose()


def gen(url: str, **kw: Any) -> Any:
    return asyncio.run(_generate(make_backend(url, **kw)))


def stream(url: str, pieces: list[str] | None = None, **kw: Any) -> Any:
    return asyncio.run(_stream(make_backend(url, **kw), pieces if pieces is not None else []))


# ---------- the client ----------


def test_answers_whole_and_streamed_with_logprobs_and_usage() -> None:
    with fault_upstream() as up:
        g = gen(up.url)
        pieces: list[str] = []
        s = stream(up.url, pieces)
    assert g.text == s.text == "".join(pieces) == Fault().text
    assert len(g.tokens) == len(s.tokens) > 3 and g.tokens[0].logprob == pytest.approx(-0.01)
    assert g.prompt_tokens > 0 and g.completion_tokens == len(g.tokens)
    assert up.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    assert up.requests[1]["json"]["stream"] is True


@pytest.mark.parametrize("url", [refused_url(), "http://localroute-no-such-host.invalid/v1"])
def test_refused_and_unresolvable_fail_cleanly(url: str) -> None:
    for call in (gen, stream):
        with pytest.raises(UpstreamError) as info:
            call(url)
        assert info.value.code in ("upstream_unavailable", "upstream_timeout")
        assert KEY not in info.value.message


def test_5xx_is_retried_then_answers() -> None:
    with fault_upstream(Fault("status", status=500), Fault("status", status=503)) as up:
        g = gen(up.url)
    assert g.text == Fault().text
    assert len(up.requests) == 3


def test_persistent_5xx_gives_up_after_max_retries() -> None:
    with fault_upstream(default=Fault("status", status=502)) as up, pytest.raises(UpstreamError) as info:
        gen(up.url, retries=2)
    assert info.value.code == "upstream_unavailable"
    assert len(up.requests) == 3


def _gap(up: FaultUpstream) -> float:
    return float(up.requests[1]["t"] - up.requests[0]["t"])


@pytest.mark.parametrize("header", ["seconds", "http-date"])
def test_429_retry_after_is_obeyed(header: str) -> None:
    value = "1" if header == "seconds" else format_datetime(datetime.fromtimestamp(time.time() + 2, UTC), usegmt=True)
    with fault_upstream(Fault("status", status=429, headers={"Retry-After": value})) as up:
        g = gen(up.url)
    assert g.text == Fault().text
    assert len(up.requests) == 2
    assert _gap(up) >= 0.95  # waited as told (an HTTP-date has one-second resolution)


def test_retry_after_beyond_the_wait_cap_fails_at_once() -> None:
    with fault_upstream(Fault("status", status=429, headers={"Retry-After": "60"})) as up, \
            pytest.raises(UpstreamError) as info:
        gen(up.url, max_total_wait_s=5.0)
    assert info.value.code == "upstream_rate_limited"
    assert len(up.requests) == 1


@pytest.mark.parametrize("call", [gen, stream])
def test_html_with_200_is_a_bad_response(call: Any) -> None:
    with fault_upstream(default=Fault("garbage")) as up, pytest.raises(UpstreamError) as info:
        call(up.url, retries=1)
    assert info.value.code == "upstream_bad_response"
    assert len(up.requests) == 2  # retried: nothing had reached the client


def test_truncated_whole_body_is_retried() -> None:
    with fault_upstream(Fault("cut")) as up:
        g = gen(up.url)
    assert g.text == Fault().text and len(up.requests) == 2


def test_stream_cut_after_tokens_fails_and_is_never_restarted() -> None:
    pieces: list[str] = []
    with fault_upstream(Fault("cut", cut_after=3)) as up, pytest.raises(UpstreamError):
        stream(up.url, pieces)
    assert len(pieces) == 3
    assert len(up.requests) == 1


def test_stream_cut_before_any_token_is_retried() -> None:
    with fault_upstream(Fault("cut", cut_after=0)) as up:
        s = stream(up.url)
    assert s.text == Fault().text and len(up.requests) == 2


def test_stall_with_keepalives_hits_the_first_token_deadline() -> None:
    d = Deadlines(connect_s=1.0, first_token_s=0.5, idle_s=5.0, total_s=10.0)
    with fault_upstream(default=Fault("stall", cut_after=0, keepalive_every_s=0.05)) as up:
        with pytest.raises(UpstreamError) as info:
            stream(up.url, retries=0, deadlines=d)
        assert up.wait_for(lambda u: u.aborted == 1)
    assert info.value.code == "upstream_timeout" and "first-token" in info.value.message


def test_first_token_deadline_counts_from_the_request_not_the_headers() -> None:
    """Headers at 0.6 s and a first token 0.6 s later is 1.2 s to the first token: over a 1 s
    deadline (it was counted from the headers, so a first token could take twice the deadline)."""
    d = Deadlines(connect_s=1.0, first_token_s=1.0, idle_s=5.0, total_s=10.0)
    with fault_upstream(default=Fault(delay_s=0.6, token_delay_s=0.6)) as up, pytest.raises(UpstreamError) as info:
        stream(up.url, retries=0, deadlines=d)
    assert info.value.code == "upstream_timeout" and "first-token" in info.value.message
    assert len(up.requests) == 1


@pytest.mark.parametrize("call", [gen, stream])
def test_error_body_that_stalls_is_cut_at_the_first_token_deadline(call: Any) -> None:
    """A 500 whose body never completes is answered at the first-token deadline, not idle_s later."""
    d = Deadlines(connect_s=1.0, first_token_s=0.5, idle_s=30.0, total_s=60.0)
    t0 = time.monotonic()
    with fault_upstream(default=Fault("status", status=500, stall_body=True)) as up, \
            pytest.raises(UpstreamError) as info:
        call(up.url, retries=0, deadlines=d)
    assert info.value.code == "upstream_unavailable" and len(up.requests) == 1
    assert time.monotonic() - t0 < 10.0  # far below idle_s (30 s)


def test_half_open_probe_is_one_attempt_whatever_the_retry_policy() -> None:
    async def case(up: FaultUpstream) -> tuple[str | None, int]:
        b = make_backend(up.url, retries=5, threshold=1, reset_s=0.2)
        try:
            with pytest.raises(UpstreamError):
                await b.generate(request())  # opens the circuit (its retry then fails fast)
            await asyncio.sleep(0.25)
            seen = len(up.requests)
            with pytest.raises(UpstreamError) as info:
                await b.generate(request())  # the probe
            return info.value.code, len(up.requests) - seen
        finally:
            await b.aclose()

    with fault_upstream(default=Fault("status", status=503, headers={"Retry-After": "1"})) as up:
        code, attempts = asyncio.run(case(up))
    assert code == "upstream_unavailable" and attempts == 1  # its own failure, not circuit_open after a wait


def test_stall_mid_stream_hits_the_idle_deadline() -> None:
    d = Deadlines(connect_s=1.0, first_token_s=5.0, idle_s=0.5, total_s=10.0)
    pieces: list[str] = []
    with fault_upstream(default=Fault("stall", cut_after=2, keepalive_every_s=0.05)) as up, \
            pytest.raises(UpstreamError) as info:
        stream(up.url, pieces, retries=2, deadlines=d)
    assert "idle" in info.value.message
    assert len(pieces) == 2 and len(up.requests) == 1  # bytes were out: no retry


def test_whole_answer_stalled_by_whitespace_hits_the_idle_deadline() -> None:
    d = Deadlines(connect_s=1.0, first_token_s=5.0, idle_s=0.4, total_s=10.0)
    with fault_upstream(default=Fault("stall", keepalive_every_s=0.05)) as up, \
            pytest.raises(UpstreamError) as info:
        gen(up.url, retries=0, deadlines=d)
    assert "idle" in info.value.message


def test_total_deadline_bounds_retries() -> None:
    d = Deadlines(connect_s=1.0, first_token_s=0.3, idle_s=0.3, total_s=1.0)
    with fault_upstream(default=Fault("hang")) as up, pytest.raises(UpstreamError) as info:
        gen(up.url, retries=10, deadlines=d)
    assert info.value.code == "upstream_timeout"
    assert 1 <= len(up.requests) <= 4


def test_breaker_opens_then_fails_fast_then_probes() -> None:
    async def case(up: FaultUpstream) -> list[str]:
        b = make_backend(up.url, retries=0, threshold=2, reset_s=0.3)
        outcomes = []
        try:
            for _ in range(3):
                try:
                    await b.generate(request())
                    outcomes.append("ok")
                except CircuitOpenError:
                    outcomes.append("open")
                except UpstreamError:
                    outcomes.append("error")
            assert b.health()["circuit"] == "open" and not b.health()["ok"]
            await asyncio.sleep(0.35)
            await b.generate(request())  # the half-open probe succeeds
            outcomes.append("ok")
            assert b.breaker.state == "closed"
        finally:
            await b.aclose()
        return outcomes

    with fault_upstream(Fault("status", status=500), Fault("status", status=500)) as up:
        outcomes = asyncio.run(case(up))
    assert outcomes == ["error", "error", "open", "ok"]
    assert len(up.requests) == 3  # the fast failure never reached the upstream


def test_cancelled_call_aborts_the_upstream_request() -> None:
    async def case(up: FaultUpstream) -> None:
        b = make_backend(up.url)
        task = asyncio.ensure_future(b.generate(request()))
        while not up.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await b.aclose()

    with fault_upstream(default=Fault(delay_s=10.0)) as up:
        asyncio.run(case(up))
        assert up.wait_for(lambda u: u.aborted == 1)
    assert up.completed == 0


def test_upstream_errors_are_scrubbed() -> None:
    leaky = json.dumps({"error": {"message": f"bad key {KEY} at https://api.example/v1?key=SECRETQ&x=1"}})
    with fault_upstream(Fault("status", status=400, body=leaky), Fault("status", status=500, body=leaky)) as up:
        with pytest.raises(InvalidRequestError) as bad:
            gen(up.url)
        with pytest.raises(UpstreamError) as down:
            gen(up.url, retries=0)
    for message in (bad.value.message, down.value.message):
        assert KEY not in message and "SECRETQ" not in message
    assert "https://api.example/v1?[redacted]" in bad.value.message
    assert scrub("Authorization: Bearer abc.def-123", []) == "Authorization: Bearer [redacted]"


# ---------- through the server ----------


@pytest.fixture
def up() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


def _app(url: str, policy: str = "degrade", **kw: Any) -> Any:
    local = ScriptedBackend("local", text="local answer here", logprobs=-3.0)  # below threshold: escalates
    frontier = make_backend(url, retries=0, **kw)
    settings = Settings(escalation_failure_policy=policy)  # type: ignore[arg-type]
    return create_app(settings, tiers=[Tier("local", local, -1.0), Tier("frontier", frontier, None)])


def test_server_escalates_and_degrades_to_the_local_answer(up: FaultUpstream) -> None:
    up.script(Fault(), Fault("status", status=500))
    with serve_app(_app(up.url)) as base:
        client = OpenAI(base_url=base, api_key="unused", max_retries=0)
        msgs: Any = [{"role": "user", "content": "hi"}]
        ok = client.chat.completions.with_raw_response.create(model="localroute/cascade", messages=msgs)
        assert ok.headers["x-localroute-tier"] == "frontier" and "x-localroute-degraded" not in ok.headers
        bad = client.chat.completions.with_raw_response.create(model="localroute/cascade", messages=msgs)
        body = bad.parse()
    assert bad.status_code == 200
    assert bad.headers["x-localroute-degraded"] == "frontier_upstream_unavailable"
    assert bad.headers["x-localroute-tier"] == "local"
    assert body.choices[0].message.content == "local answer here"
    info = body.model_extra["localroute"]  # type: ignore[index]
    assert info["degraded"] == "frontier_upstream_unavailable" and info["escalated"] is True


def test_server_fail_policy_gives_a_clean_502(up: FaultUpstream) -> None:
    up.default = Fault("status", status=500, body=f"internal {KEY}")
    with serve_app(_app(up.url, policy="fail")) as base:
        r = httpx.post(f"{base}/chat/completions", json={"model": "localroute/cascade",
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert KEY not in r.text


def test_server_circuit_open_is_503_under_fail_policy(up: FaultUpstream) -> None:
    up.default = Fault("status", status=500)
    with serve_app(_app(up.url, policy="fail", threshold=1)) as base:
        body = {"model": "localroute/cascade", "messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(f"{base}/chat/completions", json=body)
        second = httpx.post(f"{base}/chat/completions", json=body)
    assert first.status_code == 502
    assert second.status_code == 503 and second.json()["error"]["code"] == "upstream_circuit_open"
    assert int(second.headers["retry-after"]) >= 1


def _sse(base: str, body: dict[str, Any]) -> list[str]:
    events = []
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
    return events


def test_server_stream_cut_mid_way_ends_with_error_event_and_no_done(up: FaultUpstream) -> None:
    up.script(Fault("cut", cut_after=3))
    with serve_app(_app(up.url)) as base:
        events = _sse(base, {"model": "frontier", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert sum(1 for e in events if "content" in e and '"delta"' in e) >= 3
    assert len(up.requests) == 1


def test_server_stream_failing_before_first_byte_degrades(up: FaultUpstream) -> None:
    up.script(Fault("garbage"))
    body = {"model": "localroute/cascade", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with serve_app(_app(up.url)) as base, httpx.stream("POST", f"{base}/chat/completions", timeout=30,
                                                       json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
        degraded = r.headers.get("x-localroute-degraded")
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(ln[5:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1]
                   if json.loads(ln[5:])["choices"])
    assert text == "local answer here"
    assert degraded is None or degraded.startswith("frontier_")  # header sent before the outcome is known


def test_server_client_disconnect_aborts_the_frontier_call(up: FaultUpstream) -> None:
    up.default = Fault(delay_s=10.0)
    with serve_app(_app(up.url)) as base:
        for stream_flag in (False, True):
            before = up.aborted
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/chat/completions", timeout=1.0, json={
                    "model": "frontier", "stream": stream_flag, "messages": [{"role": "user", "content": "hi"}]})
            assert up.wait_for(lambda u, b=before: u.aborted == b + 1, timeout_s=5.0), stream_flag


# ---- a tier speaking the Responses API (responses_api = true) ----


def _responses_backend(url: str, **kw: Any) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend("gpt", url, "gpt-test", api_key=KEY, responses_api=True, **kw)


def _native_request(body: dict[str, Any]) -> GenerationRequest:
    chat = {"model": body["model"], "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return GenerationRequest(messages=tuple(chat["messages"]), params=SamplingParams(max_tokens=64),
                             wire=WireRequest("chat", chat), native=WireRequest("responses", body))


NATIVE_BODY = {"model": "gpt", "input": "Weather in Paris?", "reasoning": {"effort": "low", "summary": "auto"},
               "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
               "store": False, "stream_options": {"include_obfuscation": False}, "stream": True}


def test_a_responses_request_goes_to_responses_as_sent_and_its_answer_is_decoded() -> None:
    from tests.server.responses.test_native import CALL, REASONING, response, text_item

    answer = response(REASONING, text_item("Let me check."), CALL)

    async def go(backend: OpenAIHTTPBackend, req: GenerationRequest) -> Any:
        try:
            return await backend.generate(req)
        finally:
            await backend.aclose()

    with FaultUpstream(Fault(completion=answer)) as up:
        gen = asyncio.run(go(_responses_backend(up.url), _native_request(NATIVE_BODY)))
        got = up.requests[-1]
        assert got["path"] == "/v1/responses" and got["headers"]["authorization"] == f"Bearer {KEY}"
        # a buffered call: not streamed, no stream_options; the rest as sent
        assert got["json"] == {k: v for k, v in NATIVE_BODY.items() if k not in ("stream", "stream_options")} | {
            "model": "gpt-test"}
        assert gen.text == "Let me check." and gen.finish_reason == "tool_calls" and gen.extra["native"] == answer
        assert (gen.prompt_tokens, gen.completion_tokens) == (20, 9)
        assert gen.raw is not None and gen.raw["choices"][0]["message"]["tool_calls"] == [
            {"id": "call_up1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
        # the same tier answers a chat request (or one without a native body) on /chat/completions
        plain = _native_request(NATIVE_BODY)
        up.script(Fault(text="A chat answer."))
        asyncio.run(go(_responses_backend(up.url), GenerationRequest(messages=plain.messages, wire=plain.wire)))
        assert up.requests[-1]["path"] == "/v1/chat/completions"
    with FaultUpstream() as up:  # a tier without responses_api never calls /responses
        asyncio.run(go(OpenAIHTTPBackend("chat", up.url, "chat-test"), _native_request(NATIVE_BODY)))
        assert up.requests[-1]["path"] == "/v1/chat/completions"


def test_a_responses_stream_is_decoded_and_keeps_every_event() -> None:
    from localroute.backends.openai_wire import NATIVE_EVENTS
    from tests.server.responses.test_native import call_events, text_events

    async def go(url: str) -> list[Any]:
        backend = _responses_backend(url)
        try:
            return [d async for d in backend.stream(_native_request(NATIVE_BODY))]
        finally:
            await backend.aclose()

    for events, text, finish in ((text_events("Par", "is."), "Paris.", "stop"), (call_events(), "", "tool_calls")):
        with FaultUpstream(Fault(events=events)) as up:
            deltas = asyncio.run(go(up.url))
        assert up.requests[-1]["json"] == {**NATIVE_BODY, "model": "gpt-test", "stream": True}
        assert [e for d in deltas if d.raw is not None for e in d.raw.get(NATIVE_EVENTS, ())] == events
        final = deltas[-1].final
        assert final is not None and final.text == text and final.finish_reason == finish
        assert (final.prompt_tokens, final.completion_tokens) == (20, 9)


def test_responses_api_is_a_setting_of_openai_tiers_only() -> None:
    from pydantic import ValidationError

    from localroute.backends.capabilities import capabilities_for
    from localroute.backends.openai_http import from_settings
    from localroute.settings import TierSettings

    tier = TierSettings(name="gpt", kind="openai", model="gpt-test", base_url="http://x/v1", responses_api=True)
    settings = Settings(tiers=[tier])
    backend: OpenAIHTTPBackend = from_settings(tier, settings)
    assert backend.responses_api and backend.capabilities.responses_api
    assert capabilities_for(tier).missing(frozenset({"responses_api"})) is None
    plain = TierSettings(name="chat", kind="openai", model="m", base_url="http://x/v1")
    assert not plain.responses_api and capabilities_for(plain).missing(frozenset({"responses_api"})) == "responses_api"
    assert not from_settings(plain, Settings(tiers=[plain])).responses_api
    with pytest.raises(ValidationError, match="responses_api"):
        TierSettings(name="claude", kind="anthropic", model="m", base_url="http://x/v1", responses_api=True)
    asyncio.run(backend.aclose())


def test_a_non_final_tier_whose_model_gives_no_logprobs_is_not_asked_for_them() -> None:
    """`capabilities.logprobs = false` (a reasoning model, which OpenAI answers 400 when asked for
    logprobs): a non-final tier is then not asked for them on the client's behalf, on either API."""
    from localroute.backends.openai_http import from_settings
    from localroute.settings import TierSettings

    reasoning = TierSettings(name="gpt5", kind="openai", model="gpt-5", base_url="http://x/v1", responses_api=True,
                             capabilities={"logprobs": False})  # type: ignore[arg-type]
    plain = TierSettings(name="gpt4", kind="openai", model="gpt-4.1", base_url="http://x/v1", responses_api=True)
    last = TierSettings(name="top", kind="openai", model="m", base_url="http://x/v1")
    settings = Settings(tiers=[reasoning, plain, last])
    backends = [from_settings(t, settings) for t in (reasoning, plain, last)]
    assert [b.confidence_logprobs for b in backends] == [False, True, False]
    for b in backends:
        asyncio.run(b.aclose())


def test_a_hosted_tool_at_work_is_output_for_the_first_token_deadline() -> None:
    """A web search before the first text (its call added, searching, done) is the model at work,
    not a stalled upstream, as a thinking phase is."""
    from tests.server.responses.test_native import response, text_events

    search = {"id": "ws_up", "type": "web_search_call", "status": "completed",
              "action": {"type": "search", "query": "weather Paris"}}
    text = text_events("Paris.")
    running = {**response(), "status": "in_progress", "output": [], "usage": None}
    events = [{"type": "response.created", "response": running},
              {"type": "response.output_item.added", "output_index": 0, "item": {**search, "status": "in_progress"}},
              *[{"type": "response.web_search_call.searching", "output_index": 0, "item_id": "ws_up"}] * 6,
              {"type": "response.output_item.done", "output_index": 0, "item": search},
              *text[8:]]  # 0.2 s apart: the text starts after ~2 s
    events = [{**e, "sequence_number": i} for i, e in enumerate(events)]

    async def go(url: str) -> list[StreamDelta]:
        backend = _responses_backend(url, deadlines=Deadlines(connect_s=1.0, first_token_s=0.8, idle_s=0.8,
                                                              total_s=10.0))
        try:
            return [d async for d in backend.stream(_native_request(NATIVE_BODY))]
        finally:
            await backend.aclose()

    with FaultUpstream(Fault(events=events, token_delay_s=0.2)) as up:
        deltas = asyncio.run(go(up.url))
    final = deltas[-1].final
    assert final is not None and final.text == "Paris." and final.ttft_s is not None and final.ttft_s < 0.8
