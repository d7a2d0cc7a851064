"""`localroute train --kind embedding --from-eval`: dataset items that carry a task category
(`meta.localroute_category`) train the category neighbours too (the real MiniLM encoder); items
without one index as before and never vote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from localroute.embeddings import load_encoder
from localroute.evaluation.runs import META_FILE, ROWS_FILE, from_eval_run
from localroute.routing.artifacts import load_artifact, save_artifact
from localroute.routing.embedding import EmbeddingModel
from localroute.routing.training import train_router


def test_eval_items_with_a_category_train_category_neighbours(tmp_path: Path) -> None:
    items = [("a", "What is 2 + 2?", "math"), ("b", "What is 3 + 5?", "math"),
             ("c", "I loved this movie, it was wonderful.", "sentiment"), ("d", "Capital of Peru?", None)]
    dataset = tmp_path / "items.jsonl"
    dataset.write_text("\n".join(json.dumps({"id": i, "task": "exact", "prompt": text, "answer": "x",
                                             **({"meta": {"localroute_category": c}} if c else {})})
                                 for i, text, c in items))
    run = tmp_path / "run"
    run.mkdir()
    (run / META_FILE).write_text(json.dumps({"dataset": str(dataset), "tier": "local"}))
    (run / ROWS_FILE).write_text("\n".join(json.dumps({"id": i, "cheap": {"score": 1.0}, "frontier": {"score": 1.0}})
                                           for i, _, _ in items))
    data = from_eval_run(run)
    assert list(data.categories) == ["math", "math", "sentiment", None]
    assert list(data.subset([2, 3]).categories) == ["sentiment", None]
    minilm = load_encoder("minilm")
    art = load_artifact(save_artifact(train_router("embedding", data, minilm, cache_dir=tmp_path, k=3),
                                      tmp_path / "router.npz"), "embedding")
    assert art.arrays["categories"].tolist() == ["math", "math", "sentiment", ""]
    model = EmbeddingModel(art)
    vote = model.nearest_category(minilm.encode(["What is 4 + 4?"])[0], 3, 0.3)
    assert vote is not None and vote.category == "math" and vote.votes == {"math": 2}
    assert model.nearest_category(minilm.encode(["Capital of Peru?"])[0], 1, 0.9) is None  # its own row: no category
    assert np.isclose(float(np.linalg.norm(art.arrays["vectors"][0])), 1.0, atol=1e-3)
