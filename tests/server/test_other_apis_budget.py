"""Pricing and the spend budget hold for the Responses and Messages APIs as for chat: the answer
carries its cost (header and `localroute` block), and a frontier call past the cap is a 429 in
each API's own error shape."""

from __future__ import annotations

import random

import httpx
import pytest

from localroute.backends.openai_http import OpenAIHTTPBackend
from localroute.backends.resilience import CircuitBreaker, Deadlines, RetryPolicy
from localroute.routing.base import Tier
from localroute.server import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, fault_upstream

MESSAGES = {"model": "localroute/cascade", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "localroute/cascade", "max_output_tokens": 16, "input": "hi"}


def _app(url: str) -> object:
    frontier = OpenAIHTTPBackend(
        "frontier", url, "gpt-test", deadlines=Deadlines(1.0, 5.0, 5.0, 20.0),
        retry=RetryPolicy(max_retries=0, rng=random.Random(0)), breaker=CircuitBreaker("f", 1000),
        input_usd_per_mtok=1e6, output_usd_per_mtok=1e6)  # a dollar a token
    local = ScriptedBackend("local", text="local answer", logprobs=-3.0)  # never confident: escalates
    # worst case per call: (2 + 16) prompt + 16 output tokens = $34; the first costs $19, so a second cannot fit
    # budget_state_path=None: each app starts the period afresh (the default file would carry the spend over)
    return create_app(Settings(budget_usd=40.0, budget_exhausted_policy="reject", budget_state_path=None),
                      tiers=[Tier("local", local, -1.0), Tier("frontier", frontier, None)])


def test_cost_and_budget_on_both_apis() -> None:
    for path, body in (("/messages", MESSAGES), ("/responses", RESPONSES)):
        with fault_upstream(default=Fault(prompt_tokens=10, completion_tokens=9)) as up, serve_app(_app(up.url)) as base:
            first = httpx.post(base + path, json=body, timeout=30)
            second = httpx.post(base + path, json=body, timeout=30)
        assert first.status_code == 200 and first.headers["x-localroute-tier"] == "frontier"
        assert float(first.headers["x-localroute-cost-usd"]) == pytest.approx(19.0, abs=1e-3)  # 10 + 9 tokens at $1
        assert first.json()["localroute"]["cost_usd"] == pytest.approx(19.0, abs=1e-3)
        assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
        if path == "/messages":
            assert second.json()["type"] == "error" and second.json()["error"]["type"] == "rate_limit_error"
        else:
            assert second.json()["error"]["code"] == "budget_exceeded"
