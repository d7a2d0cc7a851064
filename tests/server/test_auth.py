"""API keys: hashed at rest, constant-time checks on every route but /health, OpenAI-shaped 401,
never logged."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from localroute.errors import ConfigError
from localroute.routing.base import Tier
from localroute.server import auth
from localroute.server.app import create_app
from localroute.server.auth import ApiKeyStore
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend

KEY1 = "lr-canary-key-one-7f3a9c"
KEY2 = "lr-canary-key-two-b81e44"


def _app(**kw: Any) -> Any:
    settings = Settings(**kw)
    return create_app(settings, tiers=[Tier("fake", ScriptedBackend("fake"), None)])


def test_store_accepts_only_its_keys_and_keeps_digests() -> None:
    store = ApiKeyStore.from_keys([KEY1, KEY2])
    assert store.verify(KEY1) == hashlib.sha256(KEY1.encode()).hexdigest()[:12]
    assert store.verify(KEY2) is not None and store.verify(KEY2) != store.verify(KEY1)
    for bad in (None, "", KEY1[:-1], KEY1 + "x", KEY1.upper()):
        assert store.verify(bad) is None
    assert KEY1 not in repr(vars(store)) and KEY1.encode() not in b"".join(store._digests)


def test_every_stored_digest_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    store = ApiKeyStore.from_keys(["a-key", KEY1, "z-key"])
    assert store.verify(KEY1) is not None
    assert len(calls) == 3  # no early exit at the match
    calls.clear()
    assert store.verify("wrong") is None and len(calls) == 3


def test_key_file_holds_raw_keys_or_sha256_digests(tmp_path: Path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text(f"# team keys\n{KEY1}\nsha256:{hashlib.sha256(KEY2.encode()).hexdigest()}  # hashed\n\n")
    store = ApiKeyStore.from_settings(Settings(api_keys_file=f))
    assert store is not None and len(store) == 2
    assert store.verify(KEY1) and store.verify(KEY2)
    f.write_text("sha256:nothex\n")
    with pytest.raises(ConfigError) as info:
        ApiKeyStore.from_settings(Settings(api_keys_file=f))
    assert info.value.param == "api_keys_file"
    with pytest.raises(ConfigError):
        ApiKeyStore.from_settings(Settings(api_keys_file=tmp_path / "missing.txt"))
    assert ApiKeyStore.from_settings(Settings()) is None


def test_server_requires_a_key_everywhere_but_health(caplog: pytest.LogCaptureFixture,
                                                     capfd: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LOCALROUTE_API_KEYS", f"{KEY1},{KEY2}")
    with serve_app(_app()) as base:
        root = base.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/no-such-route"):
            r = httpx.get(f"{root}{path}")
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["type"] == "invalid_request_error"  # OpenAI's own 401 shape
            assert r.headers["www-authenticate"] == 'Bearer realm="localroute"'
        wrong = httpx.get(f"{base}/models", headers={"Authorization": "Bearer " + KEY1[:-1]})
        assert wrong.status_code == 401 and "Incorrect API key" in wrong.json()["error"]["message"]
        assert httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY2}"}).status_code == 200
        assert httpx.get(f"{root}/metrics", headers={"x-api-key": KEY1}).status_code == 200
        # unauthenticated bodies are never read: a huge one is still just a 401
        big = httpx.post(f"{base}/chat/completions", content=b"x" * 2_000_000)
        assert big.status_code == 401

        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        ok = OpenAI(base_url=base, api_key=KEY1, max_retries=0).chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].message.content == "ok fine"
    out, err = capfd.readouterr()
    for secret in (KEY1, KEY2, KEY1[:-1]):
        assert secret not in caplog.text and secret not in out and secret not in err


def test_public_paths_are_configurable() -> None:
    with serve_app(_app(api_keys=KEY1, public_paths=["/metrics"])) as base:
        root = base.removesuffix("/v1")
        assert httpx.get(f"{root}/metrics").status_code == 200
        assert httpx.get(f"{base}/models").status_code == 401


def test_no_keys_configured_means_open() -> None:
    with serve_app(_app()) as base:
        assert httpx.get(f"{base}/models").status_code == 200
