"""The backend contract: generate an answer with per-token logprobs, whole or streamed."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from localroute.backends.capabilities import Capabilities
from localroute.errors import ConfigError
from localroute.types import Generation, GenerationRequest, StreamDelta

if TYPE_CHECKING:
    from localroute.settings import Settings, TierSettings


@runtime_checkable
class Backend(Protocol):
    """One model behind one engine. Implementations live in `localroute/backends/<engine>.py`."""

    name: str
    is_local: bool
    @property
    def kind(self) -> str:
        """The engine kind (a tier's `kind` in settings): llama_cpp, transformers, vllm, openai, ..."""
        ...

    @property
    def model(self) -> str:
        """The model it serves: a GGUF file name, a checkpoint, a remote model id."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What it can serve (tools, images, context length, ...): its kind's defaults, at least."""
        ...

    @property
    def uses_gpu(self) -> bool | None:
        """Whether its tokens are priced as GPU time (None: unknown, the cost ledger decides)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What a calibrated threshold depends on: model file hash and chat template, or the
        remote model id (calibration_file.backend_fingerprint)."""
        ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Answer the request in full."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Answer token by token; the last delta carries the finished Generation."""
        ...

    def health(self) -> dict[str, Any]:
        """Cheap, non-blocking status for /health: at least {"ok": bool}."""
        ...

    async def aclose(self) -> None:
        """Release engine resources."""
        ...


# kind -> "module:factory"; the factory takes (tier, settings) and returns a Backend.
BACKENDS: dict[str, str] = {
    "llama_cpp": "localroute.backends.llama_cpp:from_settings",
    "openai": "localroute.backends.openai_http:from_settings",
    "anthropic": "localroute.backends.anthropic_http:from_settings",
    "vllm": "localroute.backends.vllm:from_settings",
    "transformers": "localroute.backends.transformers:from_settings",
}


def load_backend(tier: TierSettings, settings: Settings) -> Backend:
    """Import the tier's engine module only now, so `import localroute` stays light."""
    target = BACKENDS.get(tier.kind)
    if target is None:
        raise ConfigError(
            f"tiers.{tier.name}.kind: unknown backend {tier.kind!r}; one of {sorted(BACKENDS)}",
            param="kind",
        )
    module_name, _, factory = target.partition(":")
    module = importlib.import_module(module_name)
    backend: Backend = getattr(module, factory)(tier, settings)
    return backend
