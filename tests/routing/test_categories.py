"""Task categories: where a request's category comes from, the metrics label cap, and the cascade
applying the category's threshold (scripted tiers; the real-model path is tests/server/test_live_quality.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from localroute.errors import InvalidRequestError
from localroute.routing import CascadeRouter, Tier
from localroute.routing.categories import (
    OTHER,
    CategoryLabels,
    ResolvedCategory,
    is_name,
    resolve_category,
    split_model_alias,
    strip_category,
)
from localroute.settings import Settings
from localroute.types import GenerationRequest
from tests.fakes import ScriptedBackend

SETTINGS = Settings(categories={
    "classify": {"scorer": "choice", "choices": ["a", "b"], "system_prompt_pattern": r"(?i)classify"},
    "math": {"scorer": "numeric", "system_prompt_pattern": "arithmetic"},
})
ROUTERS = ["localroute/cascade", "smollm2-135m"]


def body(system: str | None = None, **extra: object) -> dict[str, object]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
    return {"model": "localroute/cascade", "messages": messages, **extra}


def test_the_client_names_the_category_in_metadata_or_a_header() -> None:
    got = resolve_category(SETTINGS, body("Classify this", metadata={"localroute_category": "mine"}), {})
    assert (got.name, got.source) == ("mine", "client")  # the client beats the rule
    got = resolve_category(SETTINGS, body(), {"x-localroute-category": "hdr"})
    assert (got.name, got.source) == ("hdr", "client")


def test_alias_then_rule_then_default() -> None:
    assert resolve_category(SETTINGS, body("Classify this"), {}, alias="math").source == "alias"
    got = resolve_category(SETTINGS, body("Please classify the tweet"), {})
    assert (got.name, got.source) == ("classify", "rule")
    got = resolve_category(SETTINGS, body("do arithmetic"), {})
    assert got.name == "math"
    got = resolve_category(SETTINGS, body("be nice"), {})
    assert (got.name, got.source) == ("default", "default")


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "drop;table", 7])
def test_a_bad_client_category_is_a_400_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        resolve_category(SETTINGS, body(metadata={"localroute_category": bad}), {})
    assert exc.value.param == "metadata.localroute_category" and exc.value.status_code == 400


def test_model_alias_splits_only_onto_a_known_router() -> None:
    assert split_model_alias("localroute/cascade:classify", ROUTERS) == ("localroute/cascade", "classify")
    assert split_model_alias("localroute/cascade", ROUTERS) == ("localroute/cascade", None)
    assert split_model_alias("gpt-4o:latest", ROUTERS) == ("gpt-4o:latest", None)  # unknown: left for the 404


def test_strip_category_keeps_other_metadata() -> None:
    assert strip_category(body(metadata={"localroute_category": "x", "user": "u"}))["metadata"] == {"user": "u"}
    assert "metadata" not in strip_category(body(metadata={"localroute_category": "x"}))
    # metadata.labels is localroute's too (label confidence); OpenAI caps metadata values at 512 chars
    long = '["' + '", "'.join(f"label{i}" for i in range(100)) + '"]'
    assert strip_category(body(metadata={"labels": long, "user": "u"}))["metadata"] == {"user": "u"}
    assert "metadata" not in strip_category(body(metadata={"labels": "a|b", "localroute_category": "x"}))


def test_metrics_labels_are_capped() -> None:
    labels = CategoryLabels(SETTINGS.model_copy(update={"category_max_labels": 4}))
    assert [labels.label(c) for c in ("default", "classify", "math", "new1", "new2", "new3")] == [
        "default", "classify", "math", "new1", OTHER, OTHER]
    assert labels.label("new1") == "new1"


def test_the_cascade_applies_the_category_threshold() -> None:
    local = ScriptedBackend("a", "local answer", [-0.5, -0.5])
    frontier = ScriptedBackend("f", "frontier answer", [-0.01], local=False)
    tier = Tier("a", local, -1.0, category_thresholds={"strict": -0.1})
    router = CascadeRouter([tier, Tier("f", frontier, None)])
    req = GenerationRequest(messages=({"role": "user", "content": "hi"},))
    kept = asyncio.run(router.route(req))
    assert kept.decision.answered_by == "a" and kept.decision.attempts[0].threshold == -1.0
    escalated = asyncio.run(router.route(replace(req, category="strict")))
    assert escalated.decision.answered_by == "f" and escalated.decision.attempts[0].threshold == -0.1
    assert asyncio.run(router.route(replace(req, category="unknown"))).decision.answered_by == "a"  # pooled


# ---- categories from the embedding router's nearest labelled neighbours (hand-built vectors) ----


def _unit(*xs: float) -> list[float]:
    import numpy as np

    v = np.asarray(xs, dtype=np.float32)
    return list(v / np.linalg.norm(v))


def _neighbours(k: int = 3, floor: float = 0.8) -> Any:
    import numpy as np

    from localroute.routing.categories import NeighbourCategories
    from localroute.routing.embedding import EmbeddingModel, train_embedding

    # three "math" rows around x, two "chat" rows around y, one unlabelled row right on z
    x = np.asarray([_unit(1, 0.05, 0), _unit(1, -0.05, 0), _unit(1, 0, 0.05),
                    _unit(0.05, 1, 0), _unit(-0.05, 1, 0), _unit(0, 0, 1)], dtype=np.float32)
    y = np.ones((6, 2), dtype=np.float32)
    art = train_embedding(x, y, ["cheap", "strong"], "hand", categories=["math", "math", "math", "chat", "chat", None])
    return NeighbourCategories(EmbeddingModel(art), encoder=None, k=k, min_similarity=floor)  # type: ignore[arg-type]


DEFAULT = ResolvedCategory("default", "default")


def test_an_unlabelled_request_takes_its_labelled_neighbours_majority() -> None:
    import numpy as np

    near = _neighbours()
    got = near.place(np.asarray(_unit(1, 0.01, 0.01)), DEFAULT)
    assert (got.name, got.source) == ("math", "neighbours")
    assert got.evidence["category_neighbours"]["votes"] == {"math": 3}
    assert got.evidence["category_neighbours"]["nearest_similarity"] > 0.99
    # k = 5 over the labelled rows only: the two chat rows are too far (below the floor) to vote
    assert near.model.nearest_category(np.asarray(_unit(1, 0.01, 0.01)), 5, 0.8).votes == {"math": 3}
    chat = near.place(np.asarray(_unit(0.02, 1, 0)), DEFAULT)
    assert chat.name == "chat" and chat.evidence["category_neighbours"]["votes"] == {"chat": 2}


def test_no_neighbour_above_the_floor_leaves_the_default() -> None:
    import numpy as np

    near = _neighbours()
    # right on the unlabelled row: it does not vote, and no labelled row is similar enough
    assert near.place(np.asarray(_unit(0, 0, 1)), DEFAULT) is DEFAULT
    assert near.place(np.asarray(_unit(0.7, 0.7, 0)), DEFAULT) is DEFAULT  # cos 0.74 to each: under 0.8
    assert _neighbours(floor=0.7).place(np.asarray(_unit(0.7, 0.7, 0.1)), DEFAULT).name in ("math", "chat")


def test_the_vote_is_a_plurality_with_ties_to_the_more_similar() -> None:
    import numpy as np

    from localroute.routing.embedding import vote_category

    def winner(names: list[str], sims: list[float], floor: float) -> str | None:
        vote = vote_category(names, np.asarray(sims), floor)
        return None if vote is None else vote.category

    sims = [0.96, 0.9, 0.85, 0.8, 0.5]
    assert winner(["a", "b", "b", "a", "b"], sims, 0.7) == "a"  # 2-2 above 0.7: a sums 1.76 > 1.75
    assert winner(["a", "b", "b", "c", "a"], sims, 0.0) == "b"  # 2-2-1: b sums 1.75 > a 1.46
    assert winner(["a", "b", "b"], [0.99, 0.5, 0.5], 0.0) == "b"  # the count first, the nearest one aside
    assert winner(["a", "", "", "", ""], sims, 0.99) is None


def test_an_index_without_categories_places_nothing() -> None:
    import numpy as np

    from localroute.routing.embedding import EmbeddingModel, train_embedding

    x = np.asarray([_unit(1, 0), _unit(0, 1)], dtype=np.float32)
    model = EmbeddingModel(train_embedding(x, np.ones((2, 2), dtype=np.float32), ["cheap", "strong"], "hand"))
    assert model.category_neighbours is None and model.nearest_category(x[0], 3, 0.0) is None
    assert "categories" not in model.artifact.arrays


def test_labelled_rows_share_the_whole_index_and_an_empty_label_set_is_no_categoriser() -> None:
    import numpy as np

    from localroute.routing.embedding import EmbeddingModel, train_embedding

    x = np.asarray([_unit(1, 0), _unit(0, 1), _unit(1, 1)], dtype=np.float32)
    y = np.ones((3, 2), dtype=np.float32)
    every = EmbeddingModel(train_embedding(x, y, ["cheap", "strong"], "hand", categories=["a", "b", "a"]))
    assert every.category_neighbours is not None
    assert every.category_neighbours.index is every.index  # no second copy of the vectors, no second HNSW build
    assert every.nearest_category(x[0], 1, 0.9).category == "a"  # type: ignore[union-attr]
    # an artefact whose categories array names none (written by hand or another tool): nothing to
    # vote, so no categoriser, and `serve` embeds no request for it
    art = train_embedding(x, y, ["cheap", "strong"], "hand", categories=["a", None, None])
    art.arrays["categories"] = np.asarray(["", "", ""], dtype=str)
    assert EmbeddingModel(art).category_neighbours is None


def test_a_labelled_row_votes_only_with_a_category_name() -> None:
    import numpy as np

    from localroute.routing.embedding import EmbeddingModel, train_embedding

    x = np.asarray([_unit(1, 0), _unit(1, 0.05), _unit(0, 1)], dtype=np.float32)
    y = np.ones((3, 2), dtype=np.float32)
    trained = train_embedding(x, y, ["cheap", "strong"], "hand", categories=["math\n", "Stimmung für", "chat"])
    assert list(trained.arrays["categories"]) == ["", "", "chat"] and trained.training["category_rows"] == 1
    art = train_embedding(x, y, ["cheap", "strong"], "hand", categories=["math", "math", "chat"])
    art.arrays["categories"] = np.asarray(["math\n", "x" * 65, "chat"], dtype=str)  # an artefact made elsewhere
    model = EmbeddingModel(art)
    assert model.nearest_category(x[0], 3, -1.0).votes == {"chat": 1}  # type: ignore[union-attr]
    assert is_name("math") and not is_name("math\n") and not is_name("x" * 65) and not is_name(None)
