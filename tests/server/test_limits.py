"""Per-key rate limits at the edge without Redis (per process): 429 rate_limit_exceeded with
Retry-After, each key its own window, limits by key id, and no limit on paths that do not generate."""

from __future__ import annotations

import hashlib

import httpx

from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend

KEYS = ("sk-limits-one-0123456789", "sk-limits-two-0123456789")
BODY = {"model": "localroute/cascade", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def _post(base: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{base}/chat/completions", json=BODY, timeout=30, headers={"Authorization": f"Bearer {key}"}
    )


def test_requests_per_minute_per_key_in_process() -> None:
    two = hashlib.sha256(KEYS[1].encode()).hexdigest()[:12]
    settings = Settings(
        api_keys=",".join(KEYS),
        rate_limit_default={"requests_per_min": 2},
        rate_limits={two: {"requests_per_min": 1}},
        public_paths=["/metrics"],
    )
    app = create_app(
        settings, tiers=[Tier("local", ScriptedBackend("local", text="ok", logprobs=-0.1), None)]
    )
    with serve_app(app) as base:
        one = [_post(base, KEYS[0]) for _ in range(3)]
        other = [_post(base, KEYS[1]) for _ in range(2)]
        models = httpx.get(f"{base}/models", timeout=10, headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert [r.status_code for r in one] == [200, 200, 429]
    assert [r.status_code for r in other] == [200, 429]  # its own entry, its own window
    for r in (one[2], other[1]):
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] and "requests per min" in err["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
    assert models.status_code == 200  # only generating endpoints count
    assert "x-localroute-shared-state" not in one[0].headers  # no Redis: nothing fell back
