"""Feedback round trip through the real server: a completion (official openai client, real SmolLM2),
then POST /v1/feedback (httpx) stored against its routing-log row, the review sample, and the
log turned into router training data. Also: the pre-inference policies listed and selectable by
model id on /v1/models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import NotFoundError, OpenAI

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.embeddings import load_encoder
from localroute.monitoring.feedback import FeedbackStore
from localroute.monitoring.log_report import from_routing_log
from localroute.routing.artifacts import save_artifact
from localroute.routing.base import Tier
from localroute.routing.classifier import train_classifier
from localroute.routing.embedding import train_embedding
from localroute.server.app import create_app
from tests.conftest import local_settings, serve_app


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend("smollm2", LlamaEngine(smollm2_path, n_ctx_seq=512, n_parallel=2, n_threads=2))
    yield backend
    asyncio.run(backend.aclose())


class _KeepOpen:
    """The server closes its tiers on shutdown; the module-scoped engine must outlive each app."""

    def __init__(self, inner: LlamaCppBackend) -> None:
        self.inner, self.name, self.is_local = inner, inner.name, True

    def __getattr__(self, item: str) -> object:
        return getattr(self.inner, item)

    async def aclose(self) -> None:
        return None


def _tiers(smol: LlamaCppBackend) -> list[Tier]:
    b = _KeepOpen(smol)
    return [Tier("cheap", b, -1e9), Tier("strong", b, None)]  # type: ignore[arg-type]


def test_feedback_round_trip_and_training_from_log(smol: LlamaCppBackend, tmp_path: Path) -> None:
    db = tmp_path / "routing.db"
    settings = local_settings(routing_log_path=db, log_prompts=True, review_sample_rate=1.0)
    with serve_app(create_app(settings, tiers=_tiers(smol))) as base:
        client = OpenAI(base_url=base, api_key="unused", max_retries=0)
        done = client.chat.completions.create(model="localroute/cascade", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "Name a colour."}])
        root = base.removesuffix("/v1")
        with httpx.Client(base_url=root, timeout=30) as http:
            ok = http.post("/v1/feedback", json={"request_id": done.id, "correct": True, "source": "human"})
            assert ok.status_code == 200, ok.text
            body = ok.json()
            assert body["request_id"] == done.id and body["score"] == 1.0 and body["tier"] == "cheap"
            assert http.post("/v1/feedback", json={"request_id": done.id, "score": 0.5,
                                                   "source": "metric:rouge"}).status_code == 200
            unknown = http.post("/v1/feedback", json={"request_id": "chatcmpl-nope", "score": 1.0})
            assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_request_id"
            bad = http.post("/v1/feedback", json={"request_id": done.id, "score": 3})
            assert bad.status_code == 400 and "error" in bad.json()
            neither = http.post("/v1/feedback", json={"request_id": done.id})
            assert neither.status_code == 400
            junk = http.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
            assert junk.status_code == 400
    queue = FeedbackStore(db).review_queue(pending_only=False)
    assert [r["request_id"] for r in queue] == [done.id] and queue[0]["feedback"] == 2
    assert FeedbackStore(db).review_queue(pending_only=True) == []
    data = from_routing_log(db, ["cheap", "strong"])
    assert data.texts == ["Name a colour."]
    assert data.labels[0, 0] == pytest.approx(0.75) and np.isnan(data.labels[0, 1])


def test_feedback_without_routing_log_is_a_clean_400(smol: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALROUTE_ROUTING_LOG_PATH")
    with serve_app(create_app(local_settings(), tiers=_tiers(smol))) as base:
        r = httpx.post(base + "/feedback", json={"request_id": "x", "correct": True}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "feedback_disabled"


def test_feedback_with_a_nul_character_is_a_clean_400(smol: LlamaCppBackend, tmp_path: Path) -> None:
    """NUL cannot be stored in PostgreSQL text: refused in validation (400, OpenAI-shaped), in either field."""
    settings = local_settings(routing_log_path=tmp_path / "log.db")
    with serve_app(create_app(settings, tiers=_tiers(smol))) as base:
        for body in ({"request_id": "a\u0000b", "correct": True}, {"request_id": "x", "score": 1, "source": "h\u0000"}):
            r = httpx.post(base + "/feedback", json=body, timeout=30)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and "NUL" in err["message"]


def test_policies_listed_and_selectable_by_model_id(smol: LlamaCppBackend, tmp_path: Path) -> None:
    enc = load_encoder("minilm")
    texts = ["What is 2 + 2?", "What is 5 + 3?", "Prove Fermat's little theorem.", "Prove the Cauchy-Schwarz inequality."]
    x = enc.encode(texts)
    y = np.asarray([[1, 1], [1, 1], [0, 1], [0, 1]], dtype=np.float32)
    clf = save_artifact(train_classifier(x, y, ["cheap", "strong"], "minilm", c=1.0), tmp_path / "clf.npz")
    emb = save_artifact(train_embedding(x, y, ["cheap", "strong"], "minilm", k=2), tmp_path / "emb.npz")
    settings = local_settings(router_classifier_path=clf, router_embedding_path=emb, router_uncertainty_margin=0.0)
    with serve_app(create_app(settings, tiers=_tiers(smol))) as base:
        client = OpenAI(base_url=base, api_key="unused", max_retries=0)
        ids = {m.id for m in client.models.list().data}
        assert {"localroute/cascade", "localroute/classifier", "localroute/embedding", "localroute/hybrid"} <= ids
        for policy in ("localroute/classifier", "localroute/embedding", "localroute/hybrid"):
            raw = client.chat.completions.with_raw_response.create(
                model=policy, max_tokens=2, temperature=0,
                messages=[{"role": "user", "content": "Prove the Cauchy-Schwarz inequality for vectors."}])
            assert raw.headers["x-localroute-policy"] == policy
            assert raw.headers["x-localroute-tier"] == "strong"  # decided before inference: no cheap attempt
            assert raw.headers["x-localroute-escalated"] == "false"
            evidence = raw.http_response.json()["localroute"]["evidence"]
            assert 0.0 <= evidence["router_score"] < 0.5 and evidence["encoder"] == "minilm"
        with pytest.raises(NotFoundError):
            client.chat.completions.create(model="localroute/nope", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
