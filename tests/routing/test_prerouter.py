"""Pre-inference policies: decisions from the query alone, novelty and uncertainty falling back to
the cascade. Backends are scripted (this is routing logic); the encoder is the real MiniLM."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from localroute.embeddings import Encoder, load_encoder
from localroute.routing.base import Tier
from localroute.routing.cascade import CascadeRouter
from localroute.routing.classifier import ClassifierModel, train_classifier
from localroute.routing.embedding import EmbeddingIndex, EmbeddingModel, train_embedding
from localroute.routing.prerouter import PreRouter, tier_mapping
from localroute.types import GenerationRequest
from tests.fakes import ScriptedBackend

EASY = ["What is 2 + 2?", "What is 3 + 5?", "What is 10 minus 4?", "Add 7 and 6.", "What is 9 + 1?"]
HARD = ["Prove that there are infinitely many primes of the form 4k+3.",
        "Derive the Black-Scholes partial differential equation from first principles.",
        "Prove the spectral theorem for compact self-adjoint operators on a Hilbert space.",
        "Show that the halting problem is undecidable using a diagonal argument.",
        "Derive the Euler-Lagrange equations from the principle of stationary action."]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return load_encoder("minilm")


@pytest.fixture()
def ladder() -> tuple[ScriptedBackend, ScriptedBackend, list[Tier], CascadeRouter]:
    cheap, strong = (ScriptedBackend(name, f"answer from {name}", -0.01) for name in ("cheap", "strong"))
    tiers = [Tier("cheap", cheap, -1.0), Tier("strong", strong, None)]
    return cheap, strong, tiers, CascadeRouter(tiers)


def _index(minilm: Encoder) -> EmbeddingModel:
    x = minilm.encode(EASY + HARD)
    y = np.asarray([[1.0, 1.0]] * len(EASY) + [[0.0, 1.0]] * len(HARD), dtype=np.float32)
    return EmbeddingModel(train_embedding(x, y, ["cheap", "strong"], "minilm", k=3, novelty_similarity=0.45))


def _ask(router: PreRouter, text: str) -> Any:
    return asyncio.run(router.route(GenerationRequest(messages=({"role": "user", "content": text},))))


def test_embedding_router_sends_similar_queries_where_neighbours_did_well(minilm: Encoder, ladder: Any) -> None:
    cheap, _strong, tiers, cascade = ladder
    router = PreRouter("localroute/embedding", [_index(minilm)], {"minilm": minilm}, tiers, cascade)
    easy = _ask(router, "What is 4 + 4?")
    assert easy.decision.answered_by == "cheap" and [a.tier for a in easy.decision.attempts] == ["cheap"]
    hard = _ask(router, "Prove that there are infinitely many prime numbers.")
    # decided before inference: the cheap tier was never asked
    assert hard.decision.answered_by == "strong" and cheap.calls == 1
    assert hard.decision.policy == "localroute/embedding" and hard.decision.signal == "embedding"
    assert hard.decision.evidence["router_score"] < 0.5


def test_novel_query_falls_back_to_the_cascade(minilm: Encoder, ladder: Any) -> None:
    cheap, _strong, tiers, cascade = ladder
    router = PreRouter("localroute/embedding", [_index(minilm)], {"minilm": minilm}, tiers, cascade)
    routed = _ask(router, "Recommend a good hiking trail near Lake Tahoe for a family with kids.")
    ev = routed.decision.evidence
    assert ev["novel"] is True and ev["abstained"] == "novel"
    assert ev["nearest_similarity"] < 0.45
    # the cascade ran: the cheap tier answered and its confidence was judged
    assert [a.tier for a in routed.decision.attempts] == ["cheap"] and cheap.calls == 1
    assert routed.decision.signal == "embedding>mean_logprob"


def test_hybrid_sends_uncertain_classifier_scores_to_the_cascade(minilm: Encoder, ladder: Any) -> None:
    _cheap, _strong, tiers, cascade = ladder
    x = minilm.encode(EASY + HARD)
    y = np.asarray([[1.0, 1.0]] * len(EASY) + [[0.0, 1.0]] * len(HARD), dtype=np.float32)
    clf = ClassifierModel(train_classifier(x, y, ["cheap", "strong"], "minilm", c=1.0))
    v = minilm.encode(["What is 4 + 4?"])[0]
    p = clf.score(v)["p_good"][0]
    # a margin that covers this score makes it uncertain; a zero margin decides
    wide = PreRouter("localroute/hybrid", [clf], {"minilm": minilm}, tiers, cascade, threshold=p, margin=0.01)
    assert wide.decide_vectors({"minilm": v}).tier_index is None
    sure = PreRouter("localroute/hybrid", [clf], {"minilm": minilm}, tiers, cascade, threshold=0.5, margin=0.0)
    assert sure.decide_vectors({"minilm": v}).tier_index == (0 if p >= 0.5 else 1)


def test_streaming_carries_the_pre_decision(minilm: Encoder, ladder: Any) -> None:
    cheap, _strong, tiers, cascade = ladder
    router = PreRouter("localroute/embedding", [_index(minilm)], {"minilm": minilm}, tiers, cascade)

    async def collect() -> list[Any]:
        req = GenerationRequest(messages=({"role": "user", "content": "Prove that there are infinitely many prime numbers."},))
        return [item async for item in router.route_stream(req)]

    items = asyncio.run(collect())
    assert items[0].decision.policy == "localroute/embedding"
    assert items[-1].routed is not None and items[-1].routed.decision.answered_by == "strong"
    assert cheap.calls == 0


def test_tier_mapping_by_name_then_position() -> None:
    assert tier_mapping(["b", "a"], ["a", "b", "c"]) == [1, 0]
    assert tier_mapping(["mixtral", "gpt-4"], ["small", "medium", "frontier"]) == [0, 2]


def test_hnsw_index_agrees_with_brute_force() -> None:
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    brute = EmbeddingIndex(x, brute_force_max=10_000)
    ann = EmbeddingIndex(x, brute_force_max=100)
    assert brute.method == "brute_force" and ann.method == "hnsw"
    hits = 0
    for q in x[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32):
        q /= np.linalg.norm(q)
        b_idx, b_sim = brute.search(q, 5)
        a_idx, a_sim = ann.search(q, 5)
        hits += len(set(b_idx) & set(a_idx))
        assert a_sim[0] == pytest.approx(b_sim[0], abs=1e-4) or a_idx[0] != b_idx[0]
    assert hits / 250 > 0.9


def test_hnsw_graph_is_cached_beside_the_artefact(tmp_path: Any) -> None:
    pytest.importorskip("hnswlib")
    from localroute.routing.artifacts import load_artifact, save_artifact

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (rng.random((2000, 2)) < 0.5).astype(np.float32)
    path = save_artifact(train_embedding(x, y, ["cheap", "strong"], "e", k=5), tmp_path / "emb.npz")
    first = EmbeddingModel(load_artifact(path), brute_force_max=100)
    cached = list(tmp_path.glob("emb.npz.*.hnsw"))
    assert first.index.method == "hnsw" and len(cached) == 1
    second = EmbeddingModel(load_artifact(path), brute_force_max=100)  # loads the graph, no rebuild
    assert second.score(x[7]) == first.score(x[7])


def test_a_chosen_tier_alone_scores_its_answer_as_the_cascade_does(minilm: Encoder) -> None:
    """The tier a pre-router picks answers alone; its recorded confidence must be the cascade's
    signal: the same aggregator, alpha and per-tier confidence fields."""
    cheap, strong = (ScriptedBackend(name, f"answer from {name}", [-0.01, -2.0, -0.01, -0.01]) for name in
                     ("cheap", "strong"))
    tiers = [Tier("cheap", cheap, -1.0), Tier("strong", strong, None)]
    cascade = CascadeRouter(tiers, "quantile_logprob", alpha=0.5, fields={"cheap": ("label",)})
    router = PreRouter("localroute/embedding", [_index(minilm)], {"minilm": minilm}, tiers, cascade)
    single = router._single[0]
    assert single.aggregator == "quantile_logprob" and single.alpha == 0.5 and single.fields == cascade.fields
    easy = _ask(router, "What is 4 + 4?")
    assert easy.decision.answered_by == "cheap"
    direct = asyncio.run(cascade.route(GenerationRequest(messages=({"role": "user", "content": "What is 4 + 4?"},))))
    assert easy.decision.attempts[0].confidence == pytest.approx(direct.decision.attempts[0].confidence)


MATH_ROWS = ["What is 2 + 2?", "What is 3 + 5?", "What is 10 minus 4?", "Add 7 and 6."]
SENTIMENT_ROWS = ["I loved this movie, it was wonderful.", "Terrible service, I will never come back.",
                  "The food was great and the staff were friendly.", "This phone broke after two days. Awful."]


def _labelled_artifact(minilm: Encoder, tmp_path: Any) -> Any:
    """An embedding router trained through `train_router` on rows that carry a category (and some
    that do not), saved and loaded as `serve` loads it."""
    from localroute.routing.artifacts import load_artifact, save_artifact
    from localroute.routing.training import LabelledQueries, train_router

    texts = MATH_ROWS + SENTIMENT_ROWS + HARD[:2]
    labels = np.ones((len(texts), 2), dtype=np.float32)
    categories: list[str | None] = ["math"] * 4 + ["sentiment"] * 4 + [None, None]
    art = train_router("embedding", LabelledQueries(texts, ["cheap", "strong"], labels, categories=categories),
                       minilm, cache_dir=tmp_path / "cache", k=3)
    assert art.training["category_rows"] == 8
    return load_artifact(save_artifact(art, tmp_path / "router.npz"), "embedding")


def test_labelled_neighbours_place_an_unlabelled_request_real_minilm(minilm: Encoder, tmp_path: Any) -> None:
    from localroute.routing.categories import NeighbourCategories, ResolvedCategory

    near = NeighbourCategories(EmbeddingModel(_labelled_artifact(minilm, tmp_path)), minilm, k=3,
                               min_similarity=0.3)  # measured: 0.45-0.61 to the like rows, < 0.05 unrelated
    default = ResolvedCategory("default", "default")

    def place(text: str) -> ResolvedCategory:
        return asyncio.run(near.resolve(GenerationRequest(messages=({"role": "user", "content": text},)), default))

    math = place("What is 6 + 9?")
    assert (math.name, math.source) == ("math", "neighbours")
    assert math.evidence["category_neighbours"]["votes"] == {"math": 3}
    review = place("The hotel room was dirty and the staff rude. Awful stay.")
    assert (review.name, review.source) == ("sentiment", "neighbours")
    assert set(review.evidence["category_neighbours"]["votes"]) == {"sentiment"}
    assert place("Which river flows through Vienna?") is default  # no labelled row is that similar


class _Counting:
    """The real MiniLM, counting its encode calls."""

    def __init__(self, inner: Encoder) -> None:
        self.inner, self.name, self.dim, self.calls = inner, inner.name, inner.dim, 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return self.inner.encode(texts)


def test_the_vector_memo_serves_one_request_keeps_no_text_and_stays_bounded(minilm: Encoder) -> None:
    from localroute.routing.prerouter import VectorMemo

    enc = _Counting(minilm)
    memo = VectorMemo(size=4)
    secret = "My account number is 12345678, what is my balance?"
    first = memo.encode("minilm", enc, secret, "req-1")  # the category neighbours embed it
    again = memo.encode("minilm", enc, secret, "req-1")  # the embedding policy routing the same request
    assert enc.calls == 1 and memo.hits == 1 and np.array_equal(first, again)
    assert not first.flags.writeable  # one request's readers share it: nobody may change it
    # another request with the very same text is embedded afresh: no request is answered from
    # another's vector (a faster answer would tell a client what someone else just asked)
    memo.encode("minilm", enc, secret, "req-2")
    assert enc.calls == 2 and memo.hits == 1
    assert all(secret not in repr(key) for key in memo._items)  # no prompt text kept in memory
    for i in range(10):
        memo.encode("minilm", enc, f"text {i}", f"r{i}")
    assert len(memo) == 4
    memo.encode("minilm", enc, "no id", "")
    memo.encode("minilm", enc, "no id", "")
    assert enc.calls == 14 and memo.hits == 1  # without a request id nothing is kept or shared


def test_no_memo_and_no_neighbours_without_labelled_rows(minilm: Encoder, tmp_path: Any) -> None:
    """Without category neighbours (none trained, or k = 0) the policies pay nothing for them."""
    from localroute.routing.artifacts import save_artifact
    from localroute.routing.prerouter import build_policies, category_neighbours
    from localroute.routing.training import LabelledQueries, train_router
    from localroute.settings import Settings

    cheap, strong = (ScriptedBackend(name, "a", -0.01) for name in ("cheap", "strong"))
    tiers = [Tier("cheap", cheap, -1.0), Tier("strong", strong, None)]
    texts = MATH_ROWS + SENTIMENT_ROWS
    labels = np.ones((len(texts), 2), dtype=np.float32)
    plain = save_artifact(train_router("embedding", LabelledQueries(texts, ["cheap", "strong"], labels), minilm,
                                       cache_dir=tmp_path / "c"), tmp_path / "plain.npz")
    named = save_artifact(train_router("embedding", LabelledQueries(texts, ["cheap", "strong"], labels,
                                                                    categories=["math"] * 4 + ["sentiment"] * 4),
                                       minilm, cache_dir=tmp_path / "c"), tmp_path / "named.npz")
    for path, k, placed in ((plain, 5, False), (named, 0, False), (named, 3, True)):
        settings = Settings(router_embedding_path=path, category_neighbours_k=k)
        routers = build_policies(settings, tiers, CascadeRouter(tiers))
        pre = [r for r in routers.values() if isinstance(r, PreRouter)]
        assert pre and all((r.memo is not None) == placed for r in pre), (path.name, k)
        assert (category_neighbours(settings, routers) is not None) == placed
        built = [m.category_neighbours is not None for r in pre for m in r.models
                 if isinstance(m, EmbeddingModel)]
        assert built and all(b == placed for b in built), (path.name, k)  # k = 0: no category index built
