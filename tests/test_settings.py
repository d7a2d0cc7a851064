"""One settings model: defaults < TOML file < env < explicit overrides; bad values name the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localroute.errors import ConfigError
from localroute.settings import Settings, load_settings


def test_default_ladder_is_smollm2_alone_until_a_frontier_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemma-3-270m (base) scored below SmolLM2 on the eval sets, so it is no default tier (README)."""
    assert [t.name for t in load_settings().ladder()] == ["smollm2-135m"]
    monkeypatch.setenv("LOCALROUTE_FRONTIER_BASE_URL", "http://127.0.0.1:9/v1")
    assert [t.name for t in load_settings().ladder()] == ["smollm2-135m", "frontier"]


def test_frontier_is_appended_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALROUTE_FRONTIER_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LOCALROUTE_FRONTIER_API_KEY", "sk-secret")
    s = load_settings()
    last = s.ladder()[-1]
    assert last.kind == "openai" and last.base_url == "http://127.0.0.1:9/v1"
    assert "sk-secret" not in str(s.public_dict())


def test_openai_env_vars_are_honoured_when_ours_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:10/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    s = load_settings()
    assert s.frontier_base_url == "http://127.0.0.1:10/v1"
    assert s.frontier_api_key is not None and s.frontier_api_key.get_secret_value() == "sk-openai"
    monkeypatch.setenv("LOCALROUTE_FRONTIER_BASE_URL", "http://127.0.0.1:11/v1")
    assert load_settings().frontier_base_url == "http://127.0.0.1:11/v1"


def test_precedence_file_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9001\nn_threads = 1\n[[tiers]]\nname = "a"\nmodel = "smollm2-135m"\n')
    assert load_settings(cfg).port == 9001
    monkeypatch.setenv("LOCALROUTE_PORT", "9002")
    s = load_settings(cfg)
    assert s.port == 9002 and s.n_threads == 1 and [t.name for t in s.ladder()] == ["a"]
    assert load_settings(cfg, port=9003).port == 9003


@pytest.mark.parametrize(
    ("text", "key"),
    [("n_ctx = 'x'\n", "n_ctx"), ("bogus = 1\n", "bogus"), ("port = 70000\n", "port"),
     ("[[tiers]]\nname='a'\nmodel='m'\nkind='nope'\n", "tiers.0.kind"), ("port = \n", "config")],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.param == key and key in info.value.message


def test_cli_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("n_parallel = 0\n")
    proc = subprocess.run([sys.executable, "-m", "localroute", "config", "show", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "n_parallel" in proc.stderr


def test_routing_log_target_and_shared_state_settings(tmp_path: Path) -> None:
    s = Settings(routing_log_url="postgresql://lr:s3cret@db:5432/lr", routing_log_path=tmp_path / "x.db")
    assert s.routing_log_target() == "postgresql://lr:s3cret@db:5432/lr"  # the URL wins
    shown = s.public_dict()
    assert "s3cret" not in json.dumps(shown) and shown["routing_log_url"].startswith("postgresql://lr:")
    assert Settings(routing_log_url=f"sqlite:///{tmp_path}/a.db").routing_log_target() == tmp_path / "a.db"
    assert Settings(routing_log_path=tmp_path / "b.db").routing_log_target() == tmp_path / "b.db"
    assert Settings(redis_url="redis://:pw@r:6379/0").public_dict()["redis_url"] == "**********"
    query = Settings(routing_log_url="postgresql://lr@db/lr?password=hunter2&sslpassword=keypw").public_dict()
    assert "hunter2" not in json.dumps(query) and "keypw" not in json.dumps(query)
    assert query["routing_log_url"].startswith("postgresql://lr@db/lr?password=")
    with pytest.raises(ConfigError, match="shared_state_failure"):
        load_settings(shared_state_failure="maybe")
    with pytest.raises(ConfigError, match="rate_limits"):
        load_settings(rate_limits={"abc": {"requests_per_min": 0}})
