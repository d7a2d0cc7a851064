"""Router artefacts: atomic save, validated load, training metadata kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localroute.errors import ConfigError
from localroute.routing.artifacts import RouterArtifact, load_artifact, save_artifact
from localroute.routing.classifier import ClassifierModel, train_classifier
from localroute.routing.embedding import EmbeddingModel, train_embedding


def _data(n: int = 60, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    weak = (x[:, 0] > 0).astype(np.float32)  # the cheap tier is right on one half of the space
    return x, np.stack([weak, np.ones(n, dtype=np.float32)], axis=1)


def test_classifier_round_trip_keeps_predictions_and_metadata(tmp_path: Path) -> None:
    x, y = _data()
    art = train_classifier(x, y, ["cheap", "strong"], "test-enc", c=1.0, training={"source": "unit"})
    path = save_artifact(art, tmp_path / "r" / "clf.npz")
    loaded = load_artifact(path, "classifier")
    assert loaded.tiers == ["cheap", "strong"] and loaded.encoder == "test-enc"
    assert loaded.training["source"] == "unit" and loaded.training["n_rows"] == 60
    assert "created_at" in loaded.training
    before = ClassifierModel(art).predict(x)
    after = ClassifierModel(loaded).predict(x)
    assert np.allclose(before, after)
    # it learned the split: P(cheap good) is higher where the cheap tier was right
    assert after[y[:, 0] == 1, 0].mean() > after[y[:, 0] == 0, 0].mean() + 0.3
    assert not list(path.parent.glob("*.tmp"))


def test_embedding_round_trip(tmp_path: Path) -> None:
    x, y = _data()
    path = save_artifact(train_embedding(x, y, ["cheap", "strong"], "test-enc", k=5), tmp_path / "emb.npz")
    model = EmbeddingModel(load_artifact(path, "embedding"))
    s = model.score(x[0])
    assert s["nearest_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert not s["novel"]


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    x, y = _data()
    path = save_artifact(train_embedding(x, y, ["cheap", "strong"], "e"), tmp_path / "emb.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["outcomes"] = 1.0 - arrays["outcomes"]  # flip every outcome, keep the old checksum
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match="checksum"):
        load_artifact(path)


def test_wrong_kind_missing_file_and_garbage(tmp_path: Path) -> None:
    x, y = _data()
    path = save_artifact(train_embedding(x, y, ["cheap", "strong"], "e"), tmp_path / "emb.npz")
    with pytest.raises(ConfigError, match="expected classifier"):
        load_artifact(path, "classifier")
    with pytest.raises(ConfigError, match="not found"):
        load_artifact(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError):
        load_artifact(junk)


def test_inconsistent_shapes_are_refused_at_save(tmp_path: Path) -> None:
    art = RouterArtifact("classifier", "e", ["a", "b"], {
        "mean": np.zeros(4, np.float32), "scale": np.ones(4, np.float32),
        "coef": np.zeros((3, 4), np.float32), "intercept": np.zeros(2, np.float32)})
    with pytest.raises(ConfigError, match="inconsistent"):
        save_artifact(art, tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data()
    path = save_artifact(train_embedding(x, y, ["cheap", "strong"], "e"), tmp_path / "emb.npz")
    old = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        save_artifact(train_embedding(x, y, ["cheap", "strong"], "e2"), path)
    assert path.read_bytes() == old
    assert not list(tmp_path.glob(".*.tmp"))
