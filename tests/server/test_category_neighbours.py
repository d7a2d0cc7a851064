"""Categories from the embedding router's labelled neighbours, through `serve` (issue 19): an
artefact trained on rows that carry a category (the real MiniLM encoder) places a request that
names none; the answer's `localroute` block says where the category came from and the category's
threshold is the one applied. Tiers are scripted (the category is decided before them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from localroute.embeddings import load_encoder
from localroute.routing import Tier
from localroute.routing.artifacts import save_artifact
from localroute.routing.training import LabelledQueries, train_router
from localroute.server import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.routing.test_prerouter import MATH_ROWS, SENTIMENT_ROWS


def test_serve_places_an_unlabelled_request_by_its_neighbours(tmp_path: Path) -> None:
    texts = MATH_ROWS + SENTIMENT_ROWS
    data = LabelledQueries(texts, ["local", "frontier"], np.ones((len(texts), 2), dtype=np.float32),
                           categories=["math"] * 4 + ["sentiment"] * 4)
    path = save_artifact(train_router("embedding", data, load_encoder("minilm"), cache_dir=tmp_path, k=3),
                         tmp_path / "router.npz")
    settings = Settings(router_embedding_path=path, category_neighbours_k=3, category_neighbours_min_similarity=0.3,
                        categories={"math": {"scorer": "numeric"}, "sentiment": {"scorer": "exact"}})
    tiers = [Tier("local", ScriptedBackend("local", "15", [-0.1]), -1.0),
             Tier("frontier", ScriptedBackend("frontier", "15", [-0.01], local=False), None)]
    tiers[0].set_thresholds(-1.0, {"math": -0.05})  # the category's own threshold: -0.1 fails it
    app = create_app(settings, tiers=tiers)

    def ask(client: httpx.Client, text: str, **kw: Any) -> dict[str, Any]:
        body = {"model": "localroute/cascade", "max_tokens": 4, "messages": [{"role": "user", "content": text}], **kw}
        r = client.post("/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json()["localroute"])

    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        placed = ask(client, "What is 6 + 9?")
        assert placed["evidence"]["category"] == "math" and placed["evidence"]["category_source"] == "neighbours"
        assert placed["evidence"]["category_neighbours"]["votes"] == {"math": 3}
        assert placed["attempts"][0]["threshold"] == -0.05 and placed["escalated"]  # math's threshold applied
        named = ask(client, "What is 6 + 9?", metadata={"localroute_category": "sentiment"})
        assert named["evidence"]["category_source"] == "client" and "category_neighbours" not in named["evidence"]
        memo = app.state.service.category_neighbours.memo
        hits = memo.hits
        routed = ask(client, "What is 7 + 8?", model="localroute/embedding")  # placed, then routed by the index
        assert routed["evidence"]["category_source"] == "neighbours" and routed["policy"] == "localroute/embedding"
        assert memo.hits == hits + 1  # the policy reused the vector the category was found with
        unrelated = ask(client, "Which river flows through Vienna?")
        assert unrelated["evidence"]["category"] == "default"
        assert unrelated["evidence"]["category_source"] == "default" and not unrelated["escalated"]


def test_category_names_with_a_newline_or_outside_the_name_set_never_reach_a_header(tmp_path: Path) -> None:
    """A category becomes the x-localroute-category header, a metrics label and a log value: a
    client's "math\\n" is a 400 in the API's error shape (a `$` that matched before a final newline
    let it through to a 500), and labelled rows whose category is no plain name (a dataset's
    meta.localroute_category is free text) are left out of the vote rather than break each answer."""
    texts = MATH_ROWS + SENTIMENT_ROWS
    data = LabelledQueries(texts, ["local", "frontier"], np.ones((len(texts), 2), dtype=np.float32),
                           categories=["math\n"] * 4 + ["Stimmungsanalyse für Kunden"] * 4)
    with_bad = train_router("embedding", data, load_encoder("minilm"), cache_dir=tmp_path, k=3)
    path = save_artifact(with_bad, tmp_path / "router.npz")
    settings = Settings(router_embedding_path=path, category_neighbours_k=3, category_neighbours_min_similarity=0.3)
    tiers = [Tier("local", ScriptedBackend("local", "15", [-0.1]), -1.0),
             Tier("frontier", ScriptedBackend("frontier", "15", [-0.01], local=False), None)]
    app = create_app(settings, tiers=tiers)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert app.state.service.category_neighbours is None  # no row carries a usable name
        body = {"model": "localroute/cascade", "max_tokens": 4,
                "messages": [{"role": "user", "content": "What is 6 + 9?"}]}
        r = client.post("/chat/completions", json={**body, "metadata": {"localroute_category": "math\n"}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_category", r.text
        r = client.post("/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["x-localroute-category"] == "default"
