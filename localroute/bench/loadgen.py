"""Closed-loop async load over OpenAI-compatible HTTP, timed from the SSE stream.

Each of `concurrency` workers sends one streaming chat request at a time until the request count
or the duration is used up (vLLM's `--max-concurrency` shape). Timing comes from the client side
only: ttft is the arrival of the first chunk carrying text, itl the gaps between later text chunks,
e2el the whole request, so every engine is measured the same way whatever it reports about itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one request."""

    ok: bool
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    escalated: bool | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load level: who to hit, with what, how hard and for how long."""

    base_url: str  # …/v1
    model: str
    prompts: Sequence[str]
    concurrency: int
    num_requests: int | None = None
    duration_s: float | None = None
    max_tokens: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0


def _body(spec: LoadSpec, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_one(client: httpx.AsyncClient, spec: LoadSpec, prompt: str, max_tokens: int) -> RequestResult:
    """Send one streaming request and time its chunks."""
    started = time.perf_counter()
    last: float | None = None
    result = RequestResult(ok=False)
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", f"{spec.base_url}/chat/completions",
                                 json=_body(spec, prompt, max_tokens)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return result
            esc = resp.headers.get("x-localroute-escalated")
            result.escalated = None if esc is None else esc == "true"
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))[:200]
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft_s = now - started
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.e2el_s = time.perf_counter() - started
    result.output_tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0) if usage else 0
    result.ok = last is not None
    if not result.ok:
        result.error = "no content in the stream"
    return result


async def run_load(spec: LoadSpec, on_done: Callable[[RequestResult], None] | None = None) -> tuple[
    list[RequestResult], float
]:
    """Run one level; return every request's result and the wall time of the level."""
    if spec.num_requests is None and spec.duration_s is None:
        raise ValueError("give num_requests or duration_s")
    counter = 0
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=spec.concurrency + 4, max_keepalive_connections=spec.concurrency + 4)
    timeout = httpx.Timeout(spec.timeout_s, connect=10.0)
    started = time.perf_counter()
    deadline = started + spec.duration_s if spec.duration_s is not None else None

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal counter
            while True:
                if spec.num_requests is not None and counter >= spec.num_requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                i = counter
                counter += 1
                r = await stream_one(client, spec, spec.prompts[i % len(spec.prompts)], spec.max_tokens)
                results.append(r)
                if on_done is not None:
                    on_done(r)

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return results, time.perf_counter() - started


# Not one of the measured prompts: warming up with those let llama-server answer the measured requests
# from its per-slot prompt cache (c=16, 16 requests: every prompt was cached, TTFT 132 ms), which no
# real workload of distinct prompts gets. What any engine may still reuse is the chat template's
# shared system-prompt prefix, as it would in production.
WARMUP_PROMPT = "Reply with one word: ready?"


async def warm_up(spec: LoadSpec, max_tokens: int = 8) -> None:
    """A few short requests at the level's concurrency (connections, threads, allocations warm),
    with a prompt that is not measured, so no engine's prompt cache holds a measured prompt."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(spec.timeout_s, connect=10.0)) as client:
        await asyncio.gather(*(stream_one(client, spec, f"{WARMUP_PROMPT} ({i})", max_tokens)
                               for i in range(spec.concurrency)))


async def router_overhead(base_url: str, model: str, prompts: Sequence[str], n: int,
                          max_tokens: int) -> tuple[list[float], list[float]]:
    """For non-streaming answers that stayed local, in seconds: (server, client).

    server: the `router` duration of localroute's Server-Timing header, i.e. its e2e latency from
    request arrival to response start minus the engines' own time; the router's cost. client: this
    client's e2e minus the engines' time, which adds both HTTP stacks and the loopback, as any HTTP
    engine would."""
    from localroute.server.timing import parse_server_timing

    server: list[float] = []
    client_side: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        for i in range(n):
            body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    "max_tokens": max_tokens, "temperature": 0.0}
            started = time.perf_counter()
            resp = await client.post(f"{base_url}/chat/completions", json=body)
            e2e = time.perf_counter() - started
            if resp.status_code != 200:
                continue
            info = resp.json().get("localroute") or {}
            if info.get("escalated"):
                continue
            timing = parse_server_timing(resp.headers.get("server-timing"))
            if "router" in timing and "engine" in timing:
                server.append(timing["router"] / 1e3)
                client_side.append(e2e - timing["engine"] / 1e3)
    return server, client_side
