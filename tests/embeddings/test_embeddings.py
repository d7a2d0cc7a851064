"""The sentence encoders, run for real: MiniLM (ONNX, from PyPI packages) and SmolLM2's own
mean-pooled hidden states (llama.cpp embedding mode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localroute.embeddings import Encoder, load_encoder, request_text
from localroute.errors import ConfigError

PARAPHRASE = ("How do I reset my password?", "I forgot my password, how can I change it?")
UNRELATED = "What is the boiling point of water at sea level?"


@pytest.fixture(scope="module", params=["minilm", "minilm-int8", "smollm2"])
def encoder(request: pytest.FixtureRequest) -> Encoder:
    return load_encoder(request.param)


def test_unit_norm_and_shape(encoder: Encoder) -> None:
    v = encoder.encode([PARAPHRASE[0], UNRELATED, ""])
    assert v.shape == (3, encoder.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)


def test_paraphrase_closer_than_unrelated(encoder: Encoder) -> None:
    a, b, c = encoder.encode([*PARAPHRASE, UNRELATED])
    assert float(a @ b) > float(a @ c) + 0.05


def test_vector_does_not_depend_on_batch(encoder: Encoder) -> None:
    alone = encoder.encode([PARAPHRASE[0]])[0]
    batched = encoder.encode([UNRELATED, PARAPHRASE[0]])[1]
    assert np.allclose(alone, batched, atol=1e-5)


def test_minilm_semantics_match_sentence_transformers_scale() -> None:
    """all-MiniLM-L6-v2 puts unrelated sentences near 0 and paraphrases high; a pooling bug (pads in
    the mean) pushes everything toward 0.5, which this catches."""
    enc = load_encoder("minilm")
    a, b, c = enc.encode([*PARAPHRASE, UNRELATED])
    assert float(a @ b) > 0.7
    assert float(a @ c) < 0.3


def test_long_text_is_truncated_not_rejected(encoder: Encoder) -> None:
    v = encoder.encode(["word " * 3000])
    assert np.isfinite(v).all()


def test_unknown_encoder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_encoder("no-such-encoder")


def test_request_text_takes_last_user_turn() -> None:
    msgs = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"})
    assert request_text(msgs, None) == "second"
    assert request_text(None, "raw prompt") == "raw prompt"


def test_minilm_int8_computes_in_int8_is_built_once_and_stays_close_to_minilm(tmp_path: Path) -> None:
    import onnx

    from localroute.embeddings.minilm import MiniLMInt8Encoder, build_int8_model, bundled_files

    enc = MiniLMInt8Encoder(cache_dir=tmp_path)
    built = list(tmp_path.glob("minilm-int8-*.onnx"))
    assert len(built) == 1 and enc.name == "minilm-int8"
    ops = {n.op_type for n in onnx.load(str(built[0])).graph.node}
    assert "MatMulInteger" in ops  # int8 products, not int8 storage cast back to float
    mtime = built[0].stat().st_mtime_ns
    assert build_int8_model(bundled_files()[0], tmp_path) == built[0] and built[0].stat().st_mtime_ns == mtime
    texts = [*PARAPHRASE, UNRELATED, "Write a haiku about the sea.", "Solve 3x + 5 = 20 for x."]
    cos = (enc.encode(texts) * load_encoder("minilm").encode(texts)).sum(axis=1)
    assert float(cos.min()) > 0.85  # the same model, quantised: near, but its own vector space
