"""The cheap tier's own prompt representation: mean-pooled final hidden states of its GGUF model.

This runs a separate llama.cpp context in embedding mode (the serving engine is untouched), so the
routers can use what the local tier "sees" in a prompt as features, and compare it with a
general-purpose sentence encoder (`minilm`). The model weights are the tier's own, so this adds no
download and no dependency beyond the `cpu` extra.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from localroute.errors import MissingExtraError


class LlamaEncoder:
    """Mean-pooled, L2-normalised embeddings from any GGUF causal LM (SmolLM2-135M by default)."""

    def __init__(
        self, model: str | Path = "smollm2-135m", models_dir: Path | None = None, n_ctx: int = 512, n_threads: int = 1,
        extra_buffers: str = "auto",
    ) -> None:
        """`extra_buffers`: settings.llama_extra_buffers, as for the serving engine."""
        try:
            import llama_cpp
        except ImportError as exc:
            raise MissingExtraError("llama-cpp-python", "cpu") from exc
        from localroute.backends.cpu_features import extra_buffers_choice, llama_class
        from localroute.registry import resolve_model_path
        from localroute.settings import _default_models_dir

        path = Path(model)
        if not path.is_file():
            path = resolve_model_path(str(model), models_dir or _default_models_dir())
        self.name = f"gguf:{path.stem}" if str(model) != "smollm2-135m" else "smollm2"
        self._n_ctx = n_ctx
        self.extra_buffers = extra_buffers_choice(extra_buffers)
        self._llm: Any = llama_class(self.extra_buffers.use_extra_bufts)(
            model_path=str(path),
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        self.dim = int(self._llm.n_embd())
        self._lock = threading.Lock()  # a Llama object must not be used from two threads at once

    def _truncate(self, text: str) -> str:
        tokens = self._llm.tokenize(text.encode("utf-8", errors="replace"), add_bos=True)
        if len(tokens) < self._n_ctx:
            return text
        return str(self._llm.detokenize(tokens[1 : self._n_ctx - 1]).decode("utf-8", errors="ignore"))

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = []
        with self._lock:
            for text in texts:  # one text per call: the vector never depends on its batch
                vec = np.asarray(self._llm.embed(self._truncate(text) or " ", normalize=False), dtype=np.float32)
                rows.append(vec / max(float(np.linalg.norm(vec)), 1e-12))
        return np.stack(rows)
