"""Server-Timing: the router overhead of each non-streaming answer, from the real server (SmolLM2
tier, uvicorn on 127.0.0.1, the openai client), and its histogram in /metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from openai import OpenAI

from localroute.server import create_app
from localroute.server.timing import parse_server_timing
from tests.conftest import local_settings, serve_app

MSG = [{"role": "user", "content": "What is 2 + 2?"}]


def test_parse_server_timing() -> None:
    assert parse_server_timing("engine;dur=812.4, router;dur=0.731") == {"engine": 812.4, "router": 0.731}
    assert parse_server_timing("engine;dur=1, body;dur=0.2, router;dur=0.5") == {
        "engine": 1.0, "body": 0.2, "router": 0.5}
    assert parse_server_timing('db;desc="x";dur=2, cache;dur=bad, ;dur=1, miss') == {"db": 2.0}
    assert parse_server_timing(None) == {}


def _overhead_count(url: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("localroute_router_overhead_seconds_count"))
    return float(line.split()[-1])


@pytest.mark.slow
def test_answers_carry_engine_and_router_time() -> None:
    settings = local_settings(tiers=[{"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m"}])
    with serve_app(create_app(settings)) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        before = _overhead_count(url)
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model="localroute/cascade", messages=MSG, max_tokens=8, temperature=0)
        e2e_ms = (time.perf_counter() - started) * 1e3
        timing = parse_server_timing(raw.headers.get("server-timing"))
        info = raw.parse().model_extra["localroute"]
        # the engine's part is the tier attempt's own latency; the router's part is what is left of
        # the server's time, so both fit inside what the client waited
        assert timing["engine"] == pytest.approx(info["attempts"][0]["latency_s"] * 1e3, abs=0.01)
        assert timing["engine"] > 0 and 0 <= timing["router"] and 0 <= timing["body"]
        assert timing["engine"] + timing["body"] + timing["router"] <= e2e_ms
        raw = client.completions.with_raw_response.create(model="smollm2-135m", prompt="2 + 2 =", max_tokens=3)
        assert "router" in parse_server_timing(raw.headers.get("server-timing"))
        assert _overhead_count(url) == before + 2
        # a stream's headers leave before the engine is done: no figure, rather than a wrong one
        with httpx.stream("POST", f"{url}/chat/completions", json={
                "model": "smollm2-135m", "messages": MSG, "max_tokens": 3, "stream": True}) as resp:
            assert resp.status_code == 200 and "server-timing" not in resp.headers
            resp.read()
        bad = httpx.post(f"{url}/chat/completions", json={"model": "smollm2-135m"})
        assert bad.status_code == 400 and "server-timing" not in bad.headers
        assert _overhead_count(url) == before + 2
        # a client that sends its body 300 ms after the headers: that wait is the body's, not the router's
        timing = _late_body(url, {"model": "smollm2-135m", "messages": MSG, "max_tokens": 3}, delay_s=0.3)
        assert timing["body"] >= 250
        assert timing["router"] < 100


def _late_body(url: str, body: dict[str, object], delay_s: float) -> dict[str, float]:
    """POST over a raw socket, the body `delay_s` after the headers; the Server-Timing parts."""
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        time.sleep(delay_s)
        sock.sendall(data)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, _, rest = raw.partition(b"\r\n")
    assert b" 200 " in status, raw[:300]
    headers = dict(line.split(b": ", 1) for line in rest.partition(b"\r\n\r\n")[0].split(b"\r\n"))
    return parse_server_timing(headers[b"server-timing"].decode())
