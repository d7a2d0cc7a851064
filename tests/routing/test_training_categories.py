"""`localroute train --kind embedding --from-eval`: dataset items that carry a task category
(`meta.localroute_category`) train the category neighbours too (the real MiniLM encoder); items
without one index as before and never vote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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


def _serve_labelled_log(settings_kw: dict[str, Any], tmp_path: Path) -> list[str]:
    """Requests through the real server (official openai client), each with feedback: two named by
    the client, one by a model alias, one by a system-prompt rule, one with none (the default)."""
    import httpx
    from openai import OpenAI

    from localroute.routing.base import Tier
    from localroute.server.app import create_app
    from tests.conftest import local_settings, serve_app
    from tests.fakes import ScriptedBackend

    settings = local_settings(log_prompts=True, routing_log_batch_s=0.01,
                              categories={"support": {"system_prompt_pattern": "bank"}}, **settings_kw)
    tiers = [Tier("local", ScriptedBackend("local", logprobs=-0.01), -1.0), Tier("frontier", ScriptedBackend("frontier"))]
    asked = [("localroute/cascade", "What is 2 + 2?", None, "math"),
             ("localroute/cascade", "What is 3 + 5?", None, "math"),
             ("localroute/cascade:sentiment", "I loved this movie, it was wonderful.", None, None),
             ("localroute/cascade", "My card was charged twice.", "You answer for a bank.", None),
             ("localroute/cascade", "Capital of Peru?", None, None)]
    ids = []
    with serve_app(create_app(settings, tiers=tiers)) as base:
        client = OpenAI(base_url=base, api_key="unused", max_retries=0)
        for model, text, system, category in asked:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            done = client.chat.completions.create(model=model, messages=messages, max_tokens=4,  # type: ignore[arg-type]
                                                  metadata={"localroute_category": category} if category else None)
            ids.append(done.id)
        with httpx.Client(base_url=base, timeout=30) as http:
            for request_id in ids:
                r = http.post("/feedback", json={"request_id": request_id, "correct": True})
                assert r.status_code == 200, r.text
    return ids


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_train_from_the_log_gives_the_served_categories_an_index(engine: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`localroute train --kind embedding --from-log`: each logged row carries the category it was
    served with when one was given (client, alias, rule), so the artefact has a category index as
    `--from-eval` gives; a default-category row indexes as before and never votes."""
    from contextlib import ExitStack

    from localroute.cli import main
    from localroute.monitoring.log_report import from_routing_log

    kw: dict[str, Any]
    with ExitStack() as stack:
        if engine == "sqlite":
            target, kw = str(tmp_path / "routing.db"), {"routing_log_path": tmp_path / "routing.db"}
        else:
            import psycopg

            from tests.services import postgres_server

            server = stack.enter_context(postgres_server())
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE train_from_log")
            target = server.url.rsplit("/", 1)[0] + "/train_from_log"
            kw = {"routing_log_url": target, "routing_log_path": tmp_path / "local.db",
                  "routing_log_spill_path": tmp_path / "spill.jsonl"}
        ids = _serve_labelled_log(kw, tmp_path)
        data = from_routing_log(target, ["local", "frontier"])
        by_id = dict(zip(data.ids, data.categories, strict=True))
        assert [by_id[i] for i in ids] == ["math", "math", "sentiment", "support", None]
        out = tmp_path / "router.npz"
        assert main(["train", "--kind", "embedding", "--encoder", "minilm", "--from-log", target,
                     "--tiers", "local,frontier", "--k", "3", "--out", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["categories"] == {"math": 2, "sentiment": 1, "support": 1}
    art = load_artifact(out, "embedding")
    assert sorted(art.arrays["categories"].tolist()) == ["", "math", "math", "sentiment", "support"]
    vote = EmbeddingModel(art).nearest_category(load_encoder("minilm").encode(["What is 4 + 4?"])[0], 3, 0.3)
    assert vote is not None and vote.category == "math"


def test_only_a_given_category_trains() -> None:
    """The neighbours' own guesses and the default are no training label (they would only echo the
    index); an evidence row from before categories, or broken, is none."""
    from localroute.monitoring.log_report import trained_category

    def ev(**kw: object) -> str:
        return json.dumps(kw)

    assert [trained_category(ev(category="math", category_source=s)) for s in ("client", "alias", "rule")] == \
        ["math"] * 3
    assert trained_category(ev(category="math", category_source="neighbours")) is None
    assert trained_category(ev(category="default", category_source="default")) is None
    assert trained_category(ev(category="math")) is None and trained_category(None) is None
    assert trained_category("{broken") is None and trained_category("[1]") is None
