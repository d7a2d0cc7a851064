"""The server's edge under bad input, saturation, disconnects, a dead frontier, and secrets.

Input shapes run against a scripted backend (fast); saturation, disconnects, context overflow
and the frontier-down cascade run against the real SmolLM2-135M through llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.settings import Settings
from tests.conftest import local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream, refused_url

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


# ---------- input shapes (scripted backend) ----------


@pytest.fixture(scope="module")
def fake_base() -> Iterator[str]:
    app = create_app(Settings(max_body_bytes=64_000), tiers=[Tier("fake", ScriptedBackend("fake"), None)])
    with serve_app(app) as base:
        yield base


def _chat(base: str, body: Any = None, content: bytes | None = None, **kw: Any) -> httpx.Response:
    if content is not None:
        return httpx.post(f"{base}/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30, **kw)
    return httpx.post(f"{base}/chat/completions", json=body, timeout=30, **kw)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "plain string"}],
    [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "list of parts"}]}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "developer", "content": "terse"},
     {"role": "user", "content": "and?"}],
    [{"role": "user", "content": "nul \u0000 byte"}],
    [{"role": "user", "content": ""}],
    [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}],
])
def test_valid_shapes_are_answered(fake_base: str, messages: list[dict[str, Any]]) -> None:
    r = _chat(fake_base, {"model": "fake", "messages": messages, "unknown_field": {"x": 1}, "user": "u1"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ok fine"


@pytest.mark.parametrize("body", [
    {"model": "fake", "messages": []},
    {"model": "fake"},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"model": "", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "fake", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "fake", "messages": [{"content": "hi"}]},
    {"model": "fake", "messages": "hi"},
    {"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": "fake", "messages": [{"role": "user", "content": 7}]},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "n": 2},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
    {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    [1, 2, 3],
    "just a string",
    None,
])
def test_malformed_bodies_get_openai_shaped_4xx(fake_base: str, body: Any) -> None:
    assert_openai_error(_chat(fake_base, body))


@pytest.mark.parametrize("raw", [
    b"",
    b"{not json",
    b'{"model": "fake", "messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
    b'{"model": "fake", "messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}',
    b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
])
def test_undecodable_bodies_get_400(fake_base: str, raw: bytes) -> None:
    assert_openai_error(_chat(fake_base, content=raw), 400)


def test_completions_shapes(fake_base: str) -> None:
    ok = httpx.post(f"{fake_base}/completions", json={"model": "fake", "prompt": "x\u0000y", "extra": 1})
    assert ok.status_code == 200
    for bad in ({"model": "fake", "prompt": ["a", "b"]}, {"model": "fake"}, {"model": "fake", "prompt": 3}):
        assert_openai_error(httpx.post(f"{fake_base}/completions", json=bad))


def test_body_cap_413_by_length_and_for_chunked_bodies(fake_base: str) -> None:
    big = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    err = assert_openai_error(_chat(fake_base, content=big), 413)
    assert err["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(f"{fake_base}/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert assert_openai_error(r, 413)["code"] == "request_too_large"
    small = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()
    ok = httpx.post(f"{fake_base}/chat/completions", content=iter([small[:10], small[10:]]))
    assert ok.status_code == 200


def test_unknown_route_and_method_are_openai_shaped(fake_base: str) -> None:
    root = fake_base.removesuffix("/v1")
    assert_openai_error(httpx.get(f"{root}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{fake_base}/chat/completions"), 405)


# ---------- the real model ----------

CANARY_FRONTIER_KEY = "sk-canaryfrontier-5b2e9d7c1a"


@pytest.fixture(scope="module")
def real() -> Iterator[tuple[str, Any]]:
    """SmolLM2 with 2 slots and a queue of 2, escalating (threshold above any confidence) to a
    frontier on a refused port."""
    settings = local_settings(
        tiers=[
            {"name": "smollm2", "model": "smollm2-135m", "threshold": 0.5},
            {"name": "frontier", "kind": "openai", "model": "gpt-test", "base_url": refused_url(),
             "api_key": CANARY_FRONTIER_KEY},
        ],
        n_parallel=2, max_queue=2, n_ctx=512, queue_timeout_s=60.0,
        frontier_timeout_s=3.0, frontier_first_token_timeout_s=2.0,
        engine_isolation="thread",  # these tests read the engine's own counters (process mode: test_supervised)
    )
    app = create_app(settings)
    with serve_app(app) as base:
        yield base, app.state.service


def test_context_overflow_is_400_context_length_exceeded(real: tuple[str, Any]) -> None:
    base, _ = real
    r = httpx.post(f"{base}/chat/completions", timeout=60, json={
        "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 3000}]})
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"


def test_real_model_takes_odd_but_valid_input(real: tuple[str, Any]) -> None:
    """Valid requests of unusual shapes get 200 and the model's answer, and each unusual part
    reaches the prompt (a list of parts reads as its text; a tool turn lengthens the prompt)."""
    base, _ = real

    def ask(messages: list[dict[str, Any]]) -> dict[str, Any]:
        r = httpx.post(f"{base}/chat/completions", timeout=60,
                       json={"model": "smollm2", "max_tokens": 4, "temperature": 0, "messages": messages})
        assert r.status_code == 200, (messages, r.status_code, r.text)
        body: dict[str, Any] = r.json()
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"], body
        assert choice["finish_reason"] in ("stop", "length") and 1 <= body["usage"]["completion_tokens"] <= 4
        assert r.headers["x-localroute-tier"] == "smollm2"
        return body

    ask([{"role": "user", "content": "nul\u0000byte"}])
    parts = ask([{"role": "user", "content": [{"type": "text", "text": "name "}, {"type": "text", "text": "parts"}]}])
    plain = ask([{"role": "user", "content": "name parts"}])
    assert parts["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    # tool history: the llama.cpp tier reads it (the call as the JSON it answers calls in, the result
    # as a tool turn), so both reach the prompt
    call = {"id": "c", "type": "function", "function": {"name": "lookup", "arguments": '{"k": 1}'}}
    turn = ask([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "42", "tool_call_id": "c"}])
    bare = ask([{"role": "user", "content": "q"}])
    assert turn["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"] + 15  # the call's JSON and the result


def test_saturation_rejects_overflow_fast_and_health_stays_prompt(real: tuple[str, Any]) -> None:
    base, svc = real
    engine = svc.tiers[0].backend.engine
    root = base.removesuffix("/v1")
    n = engine.n_parallel + engine.max_queue + 10
    health: list[tuple[int, float]] = []

    async def run() -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 4)) as client:
            done = asyncio.Event()

            async def poll_health() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    r = await client.get(f"{root}/health")
                    health.append((r.status_code, time.perf_counter() - t0))
                    await asyncio.sleep(0.02)

            async def one(i: int) -> tuple[int, float, str | None]:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/completions", json={
                    "model": "smollm2", "prompt": f"Story {i}: once upon a time", "max_tokens": 24,
                    "temperature": 0})
                return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")

            poller = asyncio.create_task(poll_health())
            results = await asyncio.gather(*(one(i) for i in range(n)))
            done.set()
            await poller
            return results

    results = asyncio.run(run())
    rejected = [r for r in results if r[0] == 429]
    answered = [r for r in results if r[0] == 200]
    assert len(rejected) + len(answered) == n, results
    assert len(rejected) >= 10
    assert all(r[2] is not None and int(r[2]) >= 1 for r in rejected)
    assert health and all(code == 200 for code, _ in health)
    print(f"\nsaturation n={n}: rejected={len(rejected)} max_reject_s={max(r[1] for r in rejected):.3f} "
          f"health_n={len(health)} health_max_s={max(h[1] for h in health):.3f}")


def _wait_cancel(engine: Any, before: int, timeout_s: float = 30.0) -> float | None:
    """Seconds until the engine counts the cancellation; the engine sees it at its next decode
    step, so on a contended CPU this is one (slow) step. The bound here only catches a hang."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if engine.stats["cancelled_total"] > before:
            return time.perf_counter() - t0
        time.sleep(0.01)
    return None


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_stops_decoding_and_frees_the_slot(real: tuple[str, Any], stream: bool) -> None:
    base, svc = real
    engine = svc.tiers[0].backend.engine
    cancelled = engine.stats["cancelled_total"]
    tokens_before = engine.stats["tokens_generated_total"]
    body = {"model": "smollm2", "prompt": "Chapter one. It was a dark and stormy night, and", "max_tokens": 400,
            "temperature": 1.0, "seed": 3, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{base}/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # decoding has started; now leave
        left_at = time.perf_counter()
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/completions", json=body, timeout=httpx.Timeout(60, read=0.6))
        left_at = time.perf_counter()
    took = _wait_cancel(engine, cancelled)
    assert took is not None, "the engine never dropped the abandoned request"
    stopped = engine.stats["tokens_generated_total"]
    time.sleep(0.3)
    assert engine.stats["tokens_generated_total"] == stopped  # nothing decodes for nobody
    assert stopped - tokens_before < 400
    assert engine.load()["active"] == 0 and engine.load()["waiting"] == 0
    print(f"\ndisconnect stream={stream}: engine cancelled {time.perf_counter() - left_at - 0.3:.3f}s "
          f"after the client left (poll {took:.3f}s)")


def test_frontier_down_every_request_answered_degraded(real: tuple[str, Any]) -> None:
    base, svc = real
    settings = svc.settings

    async def run() -> list[httpx.Response]:
        out: list[httpx.Response] = []
        async with httpx.AsyncClient(timeout=300) as client:
            for wave in range(2):  # each wave fits the local tier (slots + queue): only the frontier fails
                out += await asyncio.gather(*(client.post(f"{base}/chat/completions", json={
                    "model": "localroute/cascade", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Question {wave}.{i}: name a colour."}]})
                    for i in range(4)))
        return out

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for r in responses:
        assert r.headers["x-localroute-degraded"].startswith("frontier_upstream_")
        assert r.headers["x-localroute-tier"] == "smollm2"
        attempts = r.json()["localroute"]["attempts"]
        assert attempts[-1]["tier"] == "frontier" and attempts[-1]["error"]
        assert attempts[-1]["latency_s"] <= settings.frontier_timeout_s + 1.0
        assert CANARY_FRONTIER_KEY not in r.text


def test_stalled_frontier_is_cut_at_its_deadline(smollm2_path: Path) -> None:
    with FaultUpstream(default=Fault("stall", cut_after=0, keepalive_every_s=0.05)) as up:
        settings = local_settings(
            tiers=[{"name": "smollm2", "model": "smollm2-135m", "threshold": 0.5},
                   {"name": "frontier", "kind": "openai", "model": "gpt-test", "base_url": up.url}],
            n_parallel=1, n_ctx=256, frontier_timeout_s=2.0, frontier_first_token_timeout_s=1.0,
            frontier_max_retries=5,
        )
        with serve_app(create_app(settings)) as base:
            for stream in (False, True):
                r = httpx.post(f"{base}/chat/completions", timeout=60, json={
                    "model": "localroute/cascade", "max_tokens": 6, "temperature": 0, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                if not stream:
                    assert r.headers["x-localroute-degraded"] == "frontier_upstream_timeout"
                    frontier = r.json()["localroute"]["attempts"][-1]
                    assert 1.0 <= frontier["latency_s"] <= settings.frontier_timeout_s + 1.0
                else:
                    assert r.text.rstrip().endswith("data: [DONE]")
        assert up.aborted >= 2


def test_failed_engine_shows_in_health_and_errors_without_hanging(smollm2_path: Path) -> None:
    # the in-process engine's failure path (engine_isolation=process: tests/backends/test_supervised.py)
    settings = local_settings(tiers=[{"name": "solo", "model": "smollm2-135m"}], n_parallel=1, n_ctx=256,
                              engine_isolation="thread")
    app = create_app(settings)
    with serve_app(app) as base:
        root = base.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        engine = app.state.service.tiers[0].backend.engine

        async def run() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                inflight = asyncio.create_task(client.post(f"{base}/completions", json={
                    "model": "solo", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0}))
                while engine.load()["active"] == 0 and not inflight.done():
                    await asyncio.sleep(0.01)
                engine._fail("simulated crash")  # the path the engine thread takes on any exception
                return await inflight, await client.get(f"{root}/health")

        inflight, health = asyncio.run(run())
        assert inflight.status_code == 503 or inflight.status_code == 200  # 200 only if it had just finished
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        after = httpx.post(f"{base}/completions", timeout=30, json={"model": "solo", "prompt": "x", "max_tokens": 2})
        assert assert_openai_error_5xx(after)["code"] == "backend_unavailable"


def assert_openai_error_5xx(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body["error"]) == ERROR_KEYS
    return body["error"]  # type: ignore[no-any-return]


# ---------- secrets ----------

CANARY_PROMPT = "canary-prompt-8d1f0a77 my password is hunter2"
CANARY_API_KEY = "lr-canary-apikey-3c9e61"
CANARY_UPSTREAM = "upstream-canary-a4471e"


def test_canaries_never_reach_logs_routing_log_or_error_bodies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], smollm2_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    # upstream error text carrying secrets: our key, another key-like token, a URL query string
    leak = json.dumps({"error": {"message": f"bad key={CANARY_FRONTIER_KEY} or sk-{CANARY_UPSTREAM} at "
                                             f"https://x.example/v1?token={CANARY_UPSTREAM}q"}})
    db = tmp_path / "routing.db"
    bodies: list[str] = []
    with FaultUpstream() as up:
        up.script(Fault("status", status=500, body=leak), Fault("status", status=400, body=leak),
                  Fault("status", status=503, body=leak))
        settings = local_settings(
            tiers=[{"name": "smollm2", "model": "smollm2-135m", "threshold": 0.5},
                   {"name": "frontier", "kind": "openai", "model": "gpt-test", "base_url": up.url,
                    "api_key": CANARY_FRONTIER_KEY}],
            n_parallel=1, n_ctx=256, api_keys=CANARY_API_KEY, routing_log_path=db, frontier_max_retries=0,
        )
        with serve_app(create_app(settings)) as base:
            client = OpenAI(base_url=base, api_key=CANARY_API_KEY, max_retries=0)
            msgs: Any = [{"role": "user", "content": CANARY_PROMPT}]
            for stream in (False, True, False):
                r = httpx.post(f"{base}/chat/completions", timeout=60,
                               headers={"Authorization": f"Bearer {CANARY_API_KEY}"},
                               json={"model": "localroute/cascade", "max_tokens": 4, "messages": msgs,
                                     "stream": stream})
                bodies.append(r.text)
            bad = httpx.post(f"{base}/chat/completions", headers={"Authorization": f"Bearer {CANARY_API_KEY}x"},
                             json={"model": "localroute/cascade", "messages": msgs})
            bodies.append(bad.text)
            assert bad.status_code == 401
            ok = client.chat.completions.with_raw_response.create(model="smollm2", messages=msgs, max_tokens=4)
            bodies.append(ok.text)
    out, err = capfd.readouterr()
    # every log record but the test's own openai client's (localroute does not use that library;
    # the client logs its request options, prompt included, at DEBUG)
    server_records = [r for r in caplog.records if not r.name.startswith("openai")]
    assert any(r.name.startswith("localroute") for r in server_records)
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in server_records) + out + err
    stored = ""
    assert db.is_file(), "the routing log was not written"
    with sqlite3.connect(db) as conn:  # every table, every row, as text
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert "requests" in tables, tables
        for t in tables:
            stored += "\n".join(repr(row) for row in conn.execute(f'SELECT * FROM "{t}"'))
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] >= 4
    for canary in (CANARY_API_KEY, CANARY_FRONTIER_KEY, CANARY_UPSTREAM, "canary-prompt-8d1f0a77", "hunter2"):
        assert canary not in logged, canary
        assert canary not in stored, canary
        for body in bodies[:-1]:  # the last is the model's own answer to the prompt
            if canary not in ("canary-prompt-8d1f0a77", "hunter2"):
                assert canary not in body, (canary, body)
    assert any("frontier" in b for b in bodies)


# ---------- config ----------


@pytest.mark.parametrize("content,key", [
    ('n_ctx = "lots"\n', "n_ctx"),
    ("frobnicate = 1\n", "frobnicate"),
    ("port = 99999\n", "port"),
    ('escalation_failure_policy = "maybe"\n', "escalation_failure_policy"),
    ("[[tiers]]\nname = 'a'\nkind = 'nope'\nmodel = 'm'\n", "kind"),
    ("this is = = not toml\n", "config"),
])
def test_bad_config_exits_nonzero_naming_the_key(tmp_path: Path, content: str, key: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    t0 = time.perf_counter()
    cli = str(Path(sys.executable).parent / "localroute")
    proc = subprocess.run([cli, "config", "show", "--config", str(bad)],
                          check=False, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    print(f"\nbad config ({key}) rejected in {took:.2f}s")


def test_too_many_labels_are_a_400_naming_the_field(fake_base: str) -> None:
    """metadata.labels (or an enum) with thousands of labels would stall the engine thread scoring
    them: refused up front."""
    labels = json.dumps([f"label{i}" for i in range(2000)])
    r = httpx.post(f"{fake_base}/chat/completions", json={
        "model": "localroute/cascade", "messages": [{"role": "user", "content": "pick"}],
        "metadata": {"labels": json.dumps(["a", "b", "c"])}})
    assert r.status_code == 200  # a few labels: fine
    r = httpx.post(f"{fake_base}/chat/completions", json={
        "model": "localroute/cascade", "messages": [{"role": "user", "content": "pick"}], "metadata": {"labels": labels}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata.labels", r.text
    enum = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {
        "label": {"type": "string", "enum": [f"l{i}" for i in range(300)]}}}}}
    r = httpx.post(f"{fake_base}/chat/completions", json={
        "model": "localroute/cascade", "messages": [{"role": "user", "content": "pick"}], "response_format": enum})
    assert r.status_code == 400 and r.json()["error"]["param"].endswith("properties.label.enum"), r.text


def test_metadata_labels_reach_the_local_tier_but_not_the_frontier() -> None:
    """metadata.labels is localroute's (label confidence): the local engine gets the labels, the
    frontier a body without them (OpenAI caps metadata values at 512 characters)."""
    from localroute.types import Generation, GenerationRequest

    seen: list[GenerationRequest] = []

    class Recording(ScriptedBackend):
        async def generate(self, request: GenerationRequest) -> Generation:
            seen.append(request)
            return await super().generate(request)

    local = Recording("local", "b", -5.0)  # unsure: escalates
    frontier = Recording("frontier", "b", -0.1, local=False)
    app = create_app(Settings(confidence_aggregator="mean_logprob"),
                     tiers=[Tier("local", local, -1.0), Tier("frontier", frontier, None)])
    labels = json.dumps([f"a-rather-long-label-number-{i}" for i in range(40)])  # > 512 characters
    with serve_app(app) as base:
        r = httpx.post(f"{base}/chat/completions", timeout=30, json={
            "model": "localroute/cascade", "messages": [{"role": "user", "content": "pick"}],
            "metadata": {"labels": labels, "user": "u"}})
    assert r.status_code == 200 and r.json()["localroute"]["tier"] == "frontier", r.text
    to_local, to_frontier = seen
    assert len(to_local.labels) == 40
    assert to_frontier.wire is not None and to_frontier.wire.body["metadata"] == {"user": "u"}
