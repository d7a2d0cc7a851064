"""The shadow budget with shared state (issue 19): two apps on one real Redis (a throwaway
server, tests/services.py) shadow every accepted answer to one recording frontier stand-in on
127.0.0.1 (tests/fault_upstream.py); `shadow_budget_usd` is one cap across both, counted in its own
key space (the serving budget's keys stay untouched), and Redis being gone follows
`shared_state_failure` for shadow calls too, never touching the client's answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from localroute.routing import Tier
from localroute.server import create_app
from localroute.settings import Settings, TierSettings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream
from tests.services import free_port, redis_server

PRICE = 1000.0  # USD per million tokens, prompt and completion: 0.001 a token
MAX_TOKENS = 8
ACTUAL_USD = 0.015  # the stand-in reports 10 + 5 tokens
# a shadow call's worst case: the prompt's bytes ("review NN", 9) + 16 framing tokens + MAX_TOKENS
WORST_USD = (9 + 16 + MAX_TOKENS) * PRICE / 1e6
CAP_USD = 0.2  # ~13 calls; each process alone would spend up to it, two then up to twice


def settings(frontier_url: str, redis_url: str, **kw: Any) -> Settings:
    frontier = TierSettings(name="frontier", kind="openai", model="gold", base_url=frontier_url,
                            input_usd_per_mtok=PRICE, output_usd_per_mtok=PRICE)
    return Settings(tiers=[TierSettings(name="local", kind="llama_cpp", model="local"), frontier],
                    redis_url=redis_url, shadow_sample_rate=1.0, shadow_budget_usd=CAP_USD, shadow_concurrency=2,
                    shadow_queue_size=64, frontier_max_retries=0, frontier_timeout_s=10,
                    **{"budget_usd": 5.0, **kw})


def app_for(s: Settings) -> Any:
    tiers = [Tier("local", ScriptedBackend("local", "positive", [-0.1]), -100.0),
             Tier("frontier", ScriptedBackend("frontier", "positive", [-0.01], local=False), None)]
    return create_app(s, tiers=tiers)


def ask(client: httpx.Client, i: int) -> httpx.Response:
    return client.post("/chat/completions", json={
        "model": "localroute/cascade", "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": f"review {i:02d}"}]})


def settled(shadow: Any) -> bool:
    s = shadow.stats
    return bool(shadow.pending == 0) and s["drawn"] == s["dropped"] + s["scored"] + s["unscorable"] + s["failed"] + \
        s["over_budget"]


@pytest.fixture
def redis() -> Iterator[Any]:
    with redis_server() as server:
        yield server


def test_two_replicas_share_one_shadow_budget(redis: Any) -> None:
    import redis as redis_py

    with FaultUpstream(Fault(text="positive", prompt_tokens=10, completion_tokens=5)) as up, ExitStack() as stack:
        apps = [app_for(settings(up.url, redis.url)) for _ in range(2)]
        urls = [stack.enter_context(serve_app(app)) for app in apps]
        clients = [stack.enter_context(httpx.Client(base_url=u, timeout=30)) for u in urls]
        with ThreadPoolExecutor(8) as pool:  # both replicas at once, each with several draws in flight
            answers = list(pool.map(lambda i: ask(clients[i % 2], i), range(40)))
        assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "positive"
                   for r in answers)
        shadows = [app.state.live_quality.shadow for app in apps]
        deadline = time.monotonic() + 30
        while not all(settled(s) for s in shadows) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(settled(s) for s in shadows)
        time.sleep(0.3)  # the settles are sent off the worker's path
        scored = sum(s.stats["scored"] for s in shadows)
        refused = sum(s.stats["over_budget"] for s in shadows)
        assert scored == len(up.requests)  # every call that reached the frontier was one scored pair
        assert refused >= 1 and all(s.stats["scored"] >= 1 for s in shadows)  # both replicas spent, the cap bit
        # one budget across both: within the cap plus at most one reservation (the bound of
        # backends/budget.py); two per-process budgets would have let through up to twice the cap
        assert scored * ACTUAL_USD <= CAP_USD + WORST_USD, f"{scored} shadow calls for a cap of {CAP_USD}"

        r = redis_py.Redis.from_url(redis.url)
        keys = {k.decode() if isinstance(k, bytes) else str(k) for k in r.keys("localroute:*")}
        budget_keys = [k for k in keys if k.startswith("localroute:shadow_budget:") and k.endswith(":all:b")]
        assert len(budget_keys) == 1, keys
        spent = int(r.hget(budget_keys[0], "spent") or 0) / 1e9
        r.close()
        assert spent == pytest.approx(scored * ACTUAL_USD)  # Redis counted each call once, in its own keys
        assert not any(k.startswith("localroute:budget:") for k in keys)  # the serving budget: untouched


@pytest.mark.parametrize("failure", ["fail_open", "fail_closed"])
def test_shadow_budget_follows_the_failure_policy_when_redis_is_gone(failure: str) -> None:
    gone = f"redis://127.0.0.1:{free_port()}/0"
    with FaultUpstream(Fault(text="positive", prompt_tokens=10, completion_tokens=5)) as up:
        app = app_for(settings(up.url, gone, shared_state_failure=failure, shared_state_timeout_s=0.1,
                               budget_usd=None))
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            answers = [ask(client, i) for i in range(3)]
            shadow = app.state.live_quality.shadow
            deadline = time.monotonic() + 10
            while not (settled(shadow) and shadow.stats["drawn"] == 3) and time.monotonic() < deadline:
                time.sleep(0.05)
            state = app.state.service.shared_state
        # the client's answers are what they were, whatever happens to the shadow calls
        assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "positive"
                   for r in answers)
        if failure == "fail_open":  # this process's own counters: the calls go out, counted as a fallback
            assert shadow.stats["scored"] == 3 and len(up.requests) == 3
            assert state.fallbacks.get("shadow_budget") == 3
        else:  # refused: failed pairs, nothing sent
            assert shadow.stats["failed"] == 3 and not up.requests
            assert state.refusals.get("shadow_budget") == 3
