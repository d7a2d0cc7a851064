"""One bad request never takes a tier down, through real servers on 127.0.0.1 (issue 14):

- every sampling field at its type's extremes gets a 400 naming the field; any int64 seed is taken;
  then the real SmolLM2 tier (llama.cpp) still answers and /health stays 200;
- a request whose own decoding raises ends alone: the engine, its other requests and /health go on;
- deeply nested JSON, NaN and Infinity, numbers that overflow: 400, never a 5xx, and the routing log
  and metrics record the refusals;
- slow clients (a body that stops, a chunked body that never ends, half a header block, nothing at
  all, more connections than the cap) get a 408 or are closed within their deadline, under both of
  uvicorn's HTTP implementations, and their file descriptors are released;
- a half-open circuit probe ends within the first-token deadline whatever the frontier does.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localroute.errors import GenerationError
from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.server.connections import HttpImpl
from localroute.settings import Settings
from localroute.types import GenerationRequest, SamplingParams
from tests.conftest import MODELS_DIR, free_port, local_settings, serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream

ERROR_KEYS = {"message", "type", "param", "code"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fake", "prompt": "hi"}


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def with_literal(base: dict[str, Any], field: str, literal: str) -> bytes:
    """`base` with `field` set to a raw JSON text (NaN, 1e400 and 2**64 are no Python JSON values)."""
    text = json.dumps({**base, field: "@EDGE@"})
    return text.replace('"@EDGE@"', literal).encode()


# Each sampling field at the extremes of its type: negative, huge, NaN/Infinity, overflowing,
# wrong type, a bool where a number belongs. Every one must be a 400 that names the field.
CHAT_EDGES: dict[str, list[str]] = {
    "temperature": ["-1", "2.0001", "1e308", "NaN", "Infinity", "-Infinity", "1e400", '"1"', "true", "[1]", "{}"],
    "top_p": ["0", "-1", "1.5", "NaN", "-1e400", '"0.5"', "false"],
    "max_tokens": ["0", "-1", str(2**31), str(2**63), str(2**64), "1e30", "1.5", '"10"', "true", "NaN"],
    "max_completion_tokens": ["0", str(2**63), "2.5", "true"],
    "n": ["0", "-1", "129", str(2**63), "true", '"1"', "1.0"],  # 2 is served (llama.cpp tiers do n > 1)
    "seed": [str(2**63), str(-(2**63) - 1), str(2**64), str(10**40), "1.5", '"7"', "true", "NaN", "1e400"],
    "logprobs": ['"yes"', "1", "0"],
    "top_logprobs": ["-1", "21", str(2**63), "true", '"3"', "1.5", "Infinity"],
    "stop": ['["a", "b", "c", "d", "e"]', '[""]', "[1]", "1", "{}", "true"],
    "stream": ['"true"', "1"],
    "stream_options": ['{"include_usage": "yes"}', '"x"', "1"],
    "presence_penalty": ["-2.5", "3", "NaN", '"0"'],
    "frequency_penalty": ["2.01", "-1e400", "true"],
    "logit_bias": ['{"50256": 101}', '{"1": "x"}', "[1]"],
    "ignore_eos": ['"true"', "1"],
    "user": ["1", "[]"],
    "response_format": ['"json"', "1"],
}
COMPLETION_EDGES: dict[str, list[str]] = {
    "logprobs": ["-1", "6", "true", '"1"', "1.5", "NaN"],
    "echo": ['"x"', "1"],
    "prompt": ["1", "[1, 2]", '["a", "b"]', "NaN"],
    "temperature": ["-0.5", "Infinity", "true"],
    "seed": [str(2**63), "1e400"],
}
EDGE_CASES = [("chat", f, v) for f, vs in CHAT_EDGES.items() for v in vs] + \
             [("completions", f, v) for f, vs in COMPLETION_EDGES.items() for v in vs]

# The other side of each boundary: values OpenAI accepts, which must reach the tier and be answered.
VALID_EXTREMES: list[dict[str, Any]] = [
    {"seed": -1}, {"seed": -(2**63)}, {"seed": 2**63 - 1}, {"seed": 0},
    {"temperature": 0}, {"temperature": 2}, {"temperature": -0.0}, {"top_p": 1e-300}, {"top_p": 1},
    {"max_tokens": 1}, {"max_tokens": 2**31 - 1}, {"max_completion_tokens": 1}, {"n": 1},
    {"logprobs": True, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 20},
    {"presence_penalty": 0, "frequency_penalty": 0}, {"logit_bias": {}},
    {"stop": ["a", "b", "c", "d"]}, {"stop": "x"}, {"stream": False}, {"temperature": 1e-300},
]


def post_raw(base: str, endpoint: str, raw: bytes) -> httpx.Response:
    path = "chat/completions" if endpoint == "chat" else "completions"
    return httpx.post(f"{base}/{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)


# ---------- the edge, with a scripted tier (fast) ----------


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ScriptedBackend, Any]]:
    backend = ScriptedBackend("fake")
    settings = Settings(max_body_bytes=1_000_000, routing_log_path=tmp_path_factory.mktemp("log") / "routing.db")
    app = create_app(settings, tiers=[Tier("fake", backend, None)])
    with serve_app(app, settings=settings) as base:
        yield base, backend, app


@pytest.mark.parametrize("endpoint,field,literal", EDGE_CASES)
def test_sampling_field_at_its_extreme_is_a_400_naming_it(fake: tuple[str, ScriptedBackend, Any], endpoint: str,
                                                          field: str, literal: str) -> None:
    base, backend, _ = fake
    calls = backend.calls
    body = {**CHAT, "logprobs": True} if field == "top_logprobs" else CHAT if endpoint == "chat" else COMPLETION
    err = openai_error(post_raw(base, endpoint, with_literal(body, field, literal)), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].split(".")[0] == field, err
    assert backend.calls == calls  # refused before any tier saw it


@pytest.mark.parametrize("extra", VALID_EXTREMES, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_valid_extremes_are_answered(fake: tuple[str, ScriptedBackend, Any], extra: dict[str, Any]) -> None:
    base, _, _ = fake
    r = httpx.post(f"{base}/chat/completions", json={**CHAT, **extra}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("extra,param", [
    ({"presence_penalty": -2, "frequency_penalty": 2}, "presence_penalty"),
    ({"logit_bias": {"1": -100, "2": 100}}, "logit_bias"), ({"n": 2}, "n"),
])
def test_valid_extremes_a_text_only_tier_cannot_honour_are_a_400_naming_them(
        fake: tuple[str, ScriptedBackend, Any], extra: dict[str, Any], param: str) -> None:
    """Never a 200 that quietly ignores them: the only tier declares it cannot (capabilities)."""
    base, backend, _ = fake
    calls = backend.calls
    err = openai_error(httpx.post(f"{base}/chat/completions", json={**CHAT, **extra}, timeout=30), 400)
    assert err["code"] == "unsupported_capability" and err["param"] == param, err
    assert backend.calls == calls


def _deep_list(n: int) -> str:
    return "[" * n + "]" * n


def _deep_object(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


NESTED_BODIES: dict[str, tuple[str, bytes]] = {
    "100000 [": ("chat", b"[" * 100_000),
    "50000 {a:": ("chat", b'{"a":' * 50_000),
    "balanced 100000 [] as an unknown field": ("chat", with_literal(CHAT, "extra", _deep_list(100_000))),
    "balanced 50000 {a: as an unknown field": ("chat", with_literal(CHAT, "extra", _deep_object(50_000))),
    "1000 deep, under orjson's own limit": ("chat", with_literal(CHAT, "extra", _deep_list(1000))),
    "as message content": ("chat", json.dumps({**CHAT, "messages": [{"role": "user", "content": "@C@"}]})
                           .replace('"@C@"', _deep_list(50_000)).encode()),
    "as a message's unknown field": ("chat", json.dumps({**CHAT, "messages": [{"role": "user", "content": "x",
                                                                                "meta": "@C@"}]})
                                     .replace('"@C@"', _deep_object(50_000)).encode()),
    "as a response_format schema": ("chat", with_literal(CHAT, "response_format", json.dumps(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "@S@"}}).replace(
        '"@S@"', '{"type":"object","properties":{"a":' * 40 + '{"type":"string"}' + "}}" * 40))),
    "completions prompt": ("completions", with_literal(COMPLETION, "prompt", _deep_list(100_000))),
    "NaN in an unknown field": ("chat", with_literal(CHAT, "extra", "[NaN]")),
    "1e400 in an unknown field": ("chat", with_literal(CHAT, "extra", '{"x": 1e400}')),
    "lone surrogate": ("chat", with_literal(CHAT, "extra", '"\\udc00"')),
}


@pytest.mark.parametrize("name", list(NESTED_BODIES))
def test_deep_nesting_and_non_json_numbers_are_400(fake: tuple[str, ScriptedBackend, Any], name: str) -> None:
    base, backend, _ = fake
    endpoint, raw = NESTED_BODIES[name]
    calls = backend.calls
    err = openai_error(post_raw(base, endpoint, raw), 400)
    assert err["type"] == "invalid_request_error"
    assert backend.calls == calls


def test_refusals_reach_the_routing_log_and_metrics_and_the_server_goes_on(
        fake: tuple[str, ScriptedBackend, Any]) -> None:
    base, _, app = fake
    root = base.removesuffix("/v1")
    for _, raw in NESTED_BODIES.values():
        assert post_raw(base, "chat", raw).status_code == 400
    assert httpx.get(f"{root}/health").status_code == 200
    assert httpx.post(f"{base}/chat/completions", json=CHAT).status_code == 200
    feedback = httpx.post(f"{base}/feedback", content=b"[" * 100_000, headers={"content-type": "application/json"})
    openai_error(feedback, 400)
    monitoring = app.state.service.monitoring
    monitoring.routing_log.flush()
    with sqlite3.connect(monitoring.routing_log.path) as db:
        refused = db.execute("SELECT COUNT(*) FROM requests WHERE status = 400 AND policy = 'rejected'").fetchone()[0]
    assert refused >= len(NESTED_BODIES)
    metrics = httpx.get(f"{root}/metrics").text
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("localroute_requests_total{") and 'policy="rejected"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= len(NESTED_BODIES)


# ---------- the real SmolLM2 tier ----------


@pytest.fixture(scope="module")
def real(smollm2_path: Path) -> Iterator[tuple[str, Any]]:
    # in-process engine: these tests read its own state (the engine process: tests/backends/test_supervised.py)
    settings = local_settings(tiers=[{"name": "smollm2", "model": "smollm2-135m"}], n_parallel=2, n_ctx=512,
                              engine_isolation="thread")
    app = create_app(settings)
    with serve_app(app, settings=settings) as base:
        yield base, app.state.service.tiers[0].backend


def _healthy(base: str) -> None:
    health = httpx.get(f"{base.removesuffix('/v1')}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


def _answers(base: str) -> str:
    r = httpx.post(f"{base}/chat/completions", timeout=60, json={
        "model": "smollm2", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "Hi!"}]})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_every_sampling_extreme_then_the_tier_still_answers(real: tuple[str, Any]) -> None:
    base, backend = real
    chat = {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Name a colour."}]}
    completion = {"model": "smollm2", "max_tokens": 4, "prompt": "The sky is"}
    statuses = []
    for endpoint, field, literal in EDGE_CASES:
        body = chat if endpoint == "chat" else completion
        if field == "top_logprobs":
            body = {**body, "logprobs": True}
        statuses.append(post_raw(base, endpoint, with_literal(body, field, literal)).status_code)
    assert set(statuses) == {400}
    # the request: seed -1 at temperature 1 killed the tier for good
    for extra in [{"seed": -1, "temperature": 1}, {"seed": -(2**63), "temperature": 1.5, "top_p": 0.9},
                  {"seed": 2**63 - 1, "temperature": 2}, {"temperature": 1e-300, "top_p": 1e-300},
                  {"logprobs": True, "top_logprobs": 20, "temperature": 1, "seed": -7},
                  {"stop": ["a", "b", "c", "d"], "presence_penalty": 0, "logit_bias": {}}]:
        r = httpx.post(f"{base}/chat/completions", json={**chat, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
    texts = [httpx.post(f"{base}/chat/completions", json={**chat, "temperature": t}, timeout=60)
             .json()["choices"][0]["message"]["content"] for t in (0, 1e-300)]
    assert texts[0] == texts[1]  # a vanishing temperature is greedy (in float32 it sampled from NaNs)
    assert backend.engine.error is None
    _healthy(base)
    _answers(base)


def test_negative_seeds_sample_repeatably(real: tuple[str, Any]) -> None:
    base, _ = real

    def sample(seed: int) -> str:
        r = httpx.post(f"{base}/completions", timeout=60, json={
            "model": "smollm2", "prompt": "My cat is called", "max_tokens": 8, "temperature": 1.3, "seed": seed})
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    assert sample(-1) == sample(-1)
    assert sample(-(2**63)) == sample(-(2**63))
    assert len({sample(s) for s in (-1, -2, -3, 5)}) > 1


def test_a_request_that_fails_in_the_engine_ends_alone(real: tuple[str, Any]) -> None:
    """The llama.cpp engine thread raises inside one request's decoding (top-k wider than the
    vocabulary, which the edge would refuse, asked of the tier directly) while another request
    streams beside it: that one request gets a GenerationError, the other finishes, the slot is
    free again, and the tier is up."""
    base, backend = real
    engine = backend.engine
    failed = engine.stats["failed_total"]
    doomed = GenerationRequest(prompt="Once upon a time", params=SamplingParams(
        max_tokens=8, temperature=0, top_logprobs=engine.n_vocab + 1))
    fine = GenerationRequest(prompt="Once upon a time", params=SamplingParams(max_tokens=24, temperature=0))

    async def both() -> tuple[BaseException | None, Any]:
        results = await asyncio.gather(backend.generate(doomed), backend.generate(fine), return_exceptions=True)
        return results[0] if isinstance(results[0], BaseException) else None, results[1]

    error, other = asyncio.run(both())
    assert isinstance(error, GenerationError) and error.status_code == 500 and error.code == "generation_failed"
    assert not isinstance(other, BaseException) and other.completion_tokens > 0
    assert engine.stats["failed_total"] == failed + 1
    assert engine.error is None and engine._running
    deadline = time.monotonic() + 5  # a finished request's slot is freed at the end of its step, after its answer
    while engine.load()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load()["active"] == 0 and engine.load()["free_slots"] == engine.n_parallel
    _healthy(base)
    _answers(base)


# ---------- slow clients (raw sockets, both uvicorn HTTP implementations) ----------

HEADER_S = 1.0
BODY_S = 1.0
SLACK_S = 3.0  # 2 shared cores: a timer may fire late, never early; uvicorn's keep-alive close is at 5 s
IMPLS: list[HttpImpl] = ["httptools", "h11"]
POST_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1].split("/", 1)[0])


def _slow_settings(**kw: Any) -> Settings:
    return Settings(**{"http_header_timeout_s": HEADER_S, "http_body_timeout_s": BODY_S, **kw})


@pytest.fixture(scope="module", params=IMPLS)
def slow(request: pytest.FixtureRequest) -> Iterator[int]:
    settings = _slow_settings()
    app = create_app(settings, tiers=[Tier("fake", ScriptedBackend("fake"), None)])
    with serve_app(app, settings=settings, http=request.param) as base:
        yield _port(base)


def dial(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took."""
    t0 = time.monotonic()
    data = b""
    while True:
        sock.settimeout(max(0.01, limit_s - (time.monotonic() - t0)))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"still open after {limit_s:.1f}s (got {data[:200]!r})") from None
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - t0


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return int(lines[0].split()[1]), headers, body


def read_one_response(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    status, headers, body = parse_response(data)
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return status


def assert_timeout_408(data: bytes) -> None:
    status, headers, body = parse_response(data)
    assert status == 408, data[:300]
    assert headers.get("connection") == "close"
    error = json.loads(body)["error"]
    assert set(error) == ERROR_KEYS and error["code"] == "request_timeout" and error["type"] == "invalid_request_error"


def test_body_shorter_than_its_content_length_gets_408(slow: int) -> None:
    with dial(slow) as s:
        s.sendall(POST_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model"')  # 8 of 100 bytes
        data, took = until_closed(s, BODY_S + SLACK_S)
    assert_timeout_408(data)
    assert took >= 0.9 * BODY_S


def test_chunked_body_that_never_ends_gets_408(slow: int) -> None:
    """A chunk every 0.25 s: never idle, never finished; the body's deadline is for all of it."""
    with dial(slow) as s:
        s.sendall(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        while time.monotonic() - t0 < BODY_S + SLACK_S:
            if select.select([s], [], [], 0.25)[0]:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
                continue
            try:
                s.sendall(b"1\r\n \r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - t0
    assert_timeout_408(data)
    assert 0.9 * BODY_S <= took <= BODY_S + SLACK_S


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"],
                         ids=["nothing", "half the headers"])
def test_incomplete_headers_are_closed_at_their_deadline(slow: int, sent: bytes) -> None:
    with dial(slow) as s:
        s.sendall(sent)
        data, took = until_closed(s, HEADER_S + SLACK_S)
    assert data == b"" and took >= 0.9 * HEADER_S


def test_headers_trickled_a_byte_at_a_time_are_closed_at_their_deadline(slow: int) -> None:
    head = POST_HEAD + b"Content-Length: 2\r\n\r\n{}"
    with dial(slow) as s:
        t0 = time.monotonic()
        closed = False
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([s], [], [], 0.2)[0]:
                closed = s.recv(1) == b""
                break
        took = time.monotonic() - t0
    assert closed, "the trickled headers were accepted"
    assert 0.9 * HEADER_S <= took <= HEADER_S + SLACK_S


def test_next_request_on_a_kept_alive_connection_has_a_header_deadline(slow: int) -> None:
    with dial(slow) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_one_response(s) == 200
        s.sendall(b"GET /health HTTP/1.1\r\nHo")
        data, took = until_closed(s, HEADER_S + SLACK_S)
    assert data == b"" and took >= 0.9 * HEADER_S


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hundreds_of_half_open_connections_are_closed_and_their_fds_released(slow: int) -> None:
    """300 connections that sent half a header block: /health answers meanwhile, each is closed
    by the server within the header deadline, and the server's file descriptors go with them
    (client and server share this process, so a leak shows in /proc/self/fd)."""
    before = _open_fds()
    socks = [dial(slow) for _ in range(300)]
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
        t0 = time.monotonic()
        health = [httpx.get(f"http://127.0.0.1:{slow}/health", timeout=10) for _ in range(5)]
        health_s = time.monotonic() - t0
        assert all(h.status_code == 200 for h in health)
        for s in socks:
            data, _ = until_closed(s, HEADER_S + SLACK_S + 2.0 - (time.monotonic() - t0))
            assert data == b""
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while _open_fds() > before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds() <= before + 5, (before, _open_fds())
    print(f"\n300 half-open connections: 5 /health answered in {health_s:.3f}s, all closed, fds back to {before}")


@pytest.mark.parametrize("impl", IMPLS)
def test_connections_over_the_cap_get_503_at_once(impl: HttpImpl) -> None:
    cap = 20
    settings = _slow_settings(max_connections=cap)
    app = create_app(settings, tiers=[Tier("fake", ScriptedBackend("fake"), None)])
    with serve_app(app, settings=settings, http=impl) as base:
        port = _port(base)
        held = [dial(port) for _ in range(cap)]
        try:
            time.sleep(0.3)  # all accepted: the server now holds `cap` connections
            for _ in range(5):
                with dial(port) as extra:
                    data, _ = until_closed(extra, HEADER_S / 2)  # before any header deadline
                status, headers, body = parse_response(data)
                assert status == 503 and headers["connection"] == "close" and headers["retry-after"] == "1"
                assert json.loads(body)["error"]["code"] == "too_many_connections"
            for s in held:  # the ones inside the cap wait for their headers' deadline
                data, _ = until_closed(s, HEADER_S + SLACK_S)
                assert data == b""
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(f"{base.removesuffix('/v1')}/health", timeout=10).status_code == 200


def test_localroute_serve_has_the_limits(tmp_path: Path, smollm2_path: Path) -> None:
    """The real CLI (`localroute serve`) with the real SmolLM2 tier: header and body deadlines
    from the config file, and the issue's seed -1 request answered, the tier still healthy."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f'models_dir = "{MODELS_DIR}"\nn_ctx = 512\nn_parallel = 1\nn_threads = 2\n'
                      f"http_header_timeout_s = {HEADER_S}\nhttp_body_timeout_s = {BODY_S}\n"
                      '[[tiers]]\nname = "smollm2"\nmodel = "smollm2-135m"\n')
    cli = str(Path(sys.executable).parent / "localroute")
    with open(tmp_path / "serve.log", "wb") as out:
        proc = subprocess.Popen([cli, "serve", "--config", str(config), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        with dial(port) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Ha")
            data, took = until_closed(s, HEADER_S + SLACK_S)
        assert data == b"" and took >= 0.9 * HEADER_S
        with dial(port) as s:
            s.sendall(POST_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model"')
            data, _ = until_closed(s, BODY_S + SLACK_S)
        assert_timeout_408(data)
        r = httpx.post(f"{root}/v1/chat/completions", timeout=60, json={
            "model": "smollm2", "seed": -1, "temperature": 1, "max_tokens": 6,
            "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{root}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------- the half-open circuit probe ----------

FIRST_TOKEN_S = 1.0
PROBE_SLACK_S = 1.5
PROBE_FAULTS: dict[str, Fault] = {
    "500": Fault("status", status=500),
    "500 with Retry-After 5": Fault("status", status=500, headers={"Retry-After": "5"}),
    "500 whose body stalls": Fault("status", status=500, stall_body=True),
    "hang": Fault("hang"),
    "200 then keep-alives, no answer": Fault("stall", cut_after=0, keepalive_every_s=0.05),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name", list(PROBE_FAULTS))
def test_half_open_probe_ends_within_the_first_token_deadline(name: str, stream: bool) -> None:
    """The breaker opens on a 500, then after breaker_reset_s the next request carries the probe:
    whatever the frontier does to it, that client has its answer (the probe's own 502, not a
    circuit-open 503 after retry waits) within frontier_first_token_timeout_s, the upstream saw one
    request, and the circuit is open again. Retries (3 here) and long idle/total deadlines would
    otherwise have stretched it (the issue saw 22.9 s)."""
    with FaultUpstream(default=Fault("status", status=500)) as up:
        settings = local_settings(
            tiers=[{"name": "frontier", "kind": "openai", "model": "gpt-test", "base_url": up.url}],
            frontier_first_token_timeout_s=FIRST_TOKEN_S, frontier_idle_timeout_s=30.0, frontier_timeout_s=60.0,
            frontier_max_retries=3, frontier_retry_max_wait_s=10.0, breaker_failure_threshold=1,
            breaker_reset_s=0.5)
        app = create_app(settings)
        with serve_app(app, settings=settings) as base:
            breaker = app.state.service.tiers[0].backend.breaker
            body = {"model": "frontier", "max_tokens": 8, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}
            first = httpx.post(f"{base}/chat/completions", json=body, timeout=60)
            assert first.status_code in (502, 503) and breaker.state == "open"
            time.sleep(0.6)
            assert breaker.state == "half_open"
            up.script(PROBE_FAULTS[name])
            seen = len(up.requests)
            t0 = time.monotonic()
            probe = httpx.post(f"{base}/chat/completions", json=body, timeout=60)
            took = time.monotonic() - t0
            err = openai_error(probe, 502)
            assert err["code"].startswith("upstream_") and err["code"] != "upstream_circuit_open", err
            assert took <= FIRST_TOKEN_S + PROBE_SLACK_S, f"probe took {took:.2f}s"
            assert len(up.requests) == seen + 1  # one attempt: a probe is never retried
            assert breaker.state == "open"
        print(f"\nprobe against {name!r} (stream={stream}): {took:.2f}s, {err['code']}")
