"""Shared fixtures: the real bundled models, servers started for real on 127.0.0.1, and a
temporary home for every file the code writes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from localroute.registry import resolve_model_path
from localroute.server.connections import HttpImpl, server_config
from localroute.settings import REPO_ROOT, Settings

MODELS_DIR = REPO_ROOT / "models"
# a small labelled set written for the tests (tests/fixtures/README.md): eval runs without the staged data
SENTIMENT_FIXTURE = Path(__file__).parent / "fixtures" / "sentiment.jsonl"


@pytest.fixture(autouse=True)
def _isolated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything the code writes (logs, databases, calibration) goes to a temporary folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOCALROUTE_ROUTING_LOG_PATH", str(tmp_path / "routing.db"))
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "LOCALROUTE_FRONTIER_BASE_URL", "LOCALROUTE_FRONTIER_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model_path("smollm2-135m", MODELS_DIR)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return resolve_model_path("gemma-3-270m", MODELS_DIR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_app(app: Any, port: int | None = None, settings: Settings | None = None,
              http: HttpImpl = "auto") -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a thread; yield its base URL (…/v1). With
    `settings`, the server is configured as `localroute serve` configures it (header deadline,
    connection cap; `http`: uvicorn's protocol implementation)."""
    port = port or free_port()
    if settings is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    else:
        config = server_config(app, settings.model_copy(update={"host": "127.0.0.1"}), port=port,
                               log_level="warning", http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def local_settings(tiers: Sequence[dict[str, Any]] | None = None, **kw: Any) -> Settings:
    """Settings for tests: small contexts, the bundled models, 2 threads."""
    base: dict[str, Any] = {"models_dir": MODELS_DIR, "n_ctx": 1024, "n_parallel": 4, "n_threads": 2}
    if tiers is not None:
        base["tiers"] = list(tiers)
    base.update(kw)
    return Settings(**base)


def safe_extra_buffer_modes() -> list[str]:
    """llama_extra_buffers values a real-model test may load with here: all three, except `on` on
    an AMX CPU, the configuration known to crash (auto refuses it there; tests check that apart)."""
    from localroute.backends.cpu_features import extra_buffers_choice

    auto = extra_buffers_choice("auto")
    return ["auto", "off"] if "AMX present" in auto.reason else ["auto", "on", "off"]
