"""Real backends shared by the backend test files: each engine is loaded once per test session
(the transformers load alone takes tens of seconds here) and driven from one event loop, because
vLLM's async engine binds its output task to the loop it first runs on."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from localroute.backends.base import Backend, load_backend
from localroute.settings import TierSettings
from tests.conftest import local_settings

T = TypeVar("T")
KINDS = ("llama_cpp", "transformers", "vllm")
# vLLM needs a model it supports on the GPU at hand; the bundled GGUF by default.
VLLM_MODEL = os.environ.get("LOCALROUTE_TEST_VLLM_MODEL", "smollm2-135m")

_loop: asyncio.AbstractEventLoop | None = None
_backends: dict[str, Backend] = {}
_users: dict[str, int] = {}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the session's one event loop."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def missing(kind: str) -> str | None:
    """Why this backend cannot run here, or None when its packages are installed."""
    need = {
        "llama_cpp": ["llama_cpp"],
        "transformers": ["torch", "transformers", "gguf", "accelerate"],
        "vllm": ["vllm"],
    }[kind]
    absent = [m for m in need if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    extra = {"llama_cpp": "cpu", "transformers": "hf", "vllm": "gpu"}[kind]
    return f"{kind} backend needs {', '.join(absent)} (pip install 'localroute[{extra}]')"


def acquire(kind: str) -> Backend:
    """The shared backend of this kind (loaded on first use); pair with release()."""
    if kind not in _backends:
        model = VLLM_MODEL if kind == "vllm" else "smollm2-135m"
        settings = local_settings(n_parallel=4, torch_device="cpu" if kind == "transformers" else "auto")
        _backends[kind] = load_backend(TierSettings(name=f"smollm2-{kind}", kind=kind, model=model), settings)  # type: ignore[arg-type]
    _users[kind] = _users.get(kind, 0) + 1
    return _backends[kind]


def release(kind: str) -> None:
    _users[kind] -= 1
    if _users[kind] == 0:
        backend = _backends.pop(kind)
        run(backend.aclose())
