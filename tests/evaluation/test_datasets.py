"""The generic JSONL format and every adapter on slices of the real staged files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from localroute.errors import ConfigError
from localroute.evaluation.datasets import ADAPTERS, EvalItem, convert, load_items, sample, write_items
from localroute.evaluation.runner import resolve_recorded
from localroute.settings import Settings

DATA = Settings().eval_data_dir
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"staged data not found at {DATA}")


def by_id(name: str) -> dict[str, EvalItem]:
    return {it.id: it for it in convert(name, DATA)}


def test_banking77() -> None:
    items = by_id("banking77")
    assert len(items) == 3080
    first = items["banking77-0"]
    assert first.task == "choice" and first.answer == "card_arrival" and len(first.choices or []) == 77
    assert first.messages is not None and first.messages[-1]["content"] == "How do I locate my card?"
    assert first.messages[0]["role"] == "system" and "card_arrival" in first.messages[0]["content"]


def test_tweeteval() -> None:
    sent = by_id("tweeteval-sentiment")
    assert len(sent) == 12284 and sent["tweeteval-sentiment-0"].choices == ["negative", "neutral", "positive"]
    assert sent["tweeteval-sentiment-0"].answer == "neutral"  # label 1
    assert Counter(it.answer for it in sent.values())["positive"] == 2375
    emo = by_id("tweeteval-emotion")
    assert len(emo) == 1421 and emo["tweeteval-emotion-0"].choices == ["anger", "joy", "optimism", "sadness"]


def test_mmlu_joined_with_routellm_outcomes() -> None:
    items = by_id("mmlu")
    assert len(items) == 9446
    it = items["mmlu-anatomy-0"]
    assert it.answer == "A" and it.meta["subject"] == "anatomy"
    assert it.messages is not None and "stylomastoid foramen" in it.messages[0]["content"]
    assert it.outcomes["gpt-4-1106-preview"].correct is True
    assert set(it.outcomes) == {"gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"}
    assert all(len(i.outcomes) == 2 for i in items.values())


def test_gsm8k_joined_with_routellm_outcomes() -> None:
    items = by_id("gsm8k")
    assert len(items) == 1319 and items["gsm8k-0"].answer == "18" and items["gsm8k-0"].task == "numeric"
    gpt4 = sum(bool(i.outcomes["gpt-4-1106-preview"].correct) for i in items.values())
    mixtral = sum(bool(i.outcomes["mistralai/Mixtral-8x7B-Instruct-v0.1"].correct) for i in items.values())
    assert (gpt4, mixtral) == (1130, 842)  # the counts the data README states


def test_bbh_task_kinds() -> None:
    items = by_id("bbh")
    assert len(items) == 6511
    date = items["bbh-date_understanding-0"]
    assert date.task == "choice" and date.answer == "(B)" and "(F)" in (date.choices or [])
    assert items["bbh-boolean_expressions-0"].choices == ["False", "True"]
    assert items["bbh-object_counting-0"].task == "numeric" and items["bbh-object_counting-0"].answer == "8"
    assert items["bbh-word_sorting-0"].task == "exact"


def test_conll2003_spans_from_bio() -> None:
    items = by_id("conll2003")
    assert len(items) == 3453
    assert items["conll2003-0"].answer == [{"type": "location", "text": "JAPAN"}, {"type": "person", "text": "CHINA"}]
    assert items["conll2003-1"].answer == [{"type": "person", "text": "Nadim Ladki"}]


def test_restaurant8k_spans() -> None:
    items = by_id("restaurant8k")
    assert len(items) == 3731
    assert items["restaurant8k-0"].answer == [{"type": "time", "text": "13"}]
    with_span = next(i for i in items.values() if i.answer and len(i.answer[0]["text"]) > 3)
    assert with_span.messages is not None and with_span.answer[0]["text"] in with_span.messages[0]["content"]


def test_mt_bench_with_judge_scores() -> None:
    items = by_id("mt_bench")
    assert len(items) == 80
    it = items["mt_bench-81"]
    assert it.task == "judge" and it.meta["category"] == "writing"
    assert 0 < (it.outcomes["gpt-4-1106-preview"].score or 0) <= 1
    assert items["mt_bench-101"].answer  # one of the 30 questions with a reference answer


def test_limit_is_a_seeded_sample_in_file_order() -> None:
    a = convert("banking77", DATA, limit=20, seed=1)
    b = convert("banking77", DATA, limit=20, seed=1)
    assert [i.id for i in a] == [i.id for i in b]
    assert len({i.answer for i in a}) > 5  # not just the first (sorted) category
    ids = [int(i.id.split("-")[1]) for i in a]
    assert ids == sorted(ids)
    assert [i.id for i in convert("banking77", DATA, limit=20, seed=2)] != [i.id for i in a]


def test_jsonl_round_trip_and_validation(tmp_path: Path) -> None:
    items = convert("mmlu", DATA, limit=5) + convert("conll2003", DATA, limit=3)
    path = tmp_path / "set.jsonl"
    assert write_items(items, path) == 8
    back = load_items(path)
    assert [i.model_dump() for i in back] == [i.model_dump() for i in items]
    assert sample(back, 3, 0) == sample(back, 3, 0)

    bad = tmp_path / "bad.jsonl"
    for line, why in [
        ({"id": "a", "task": "choice", "prompt": "p", "choices": ["x"], "answer": "y"}, "one of `choices`"),
        ({"id": "a", "task": "exact", "answer": "y"}, "messages"),
        ({"id": "a", "task": "nope", "prompt": "p"}, "task"),
        ({"id": "a", "task": "exact", "prompt": "p", "outcomes": {"m": {}}}, "outcome"),
    ]:
        bad.write_text(json.dumps(line) + "\n")
        with pytest.raises(ConfigError, match="bad.jsonl:1"):
            load_items(bad)
    bad.write_text('{"id": "a", "task": "exact", "prompt": "p"}\n' * 2)
    with pytest.raises(ConfigError, match="duplicate"):
        load_items(bad)


def test_recorded_frontier_names_resolve() -> None:
    items = convert("gsm8k", DATA, limit=3)
    assert resolve_recorded(items, "recorded:gpt-4") == "gpt-4-1106-preview"
    assert resolve_recorded(items, "recorded:mistralai/Mixtral-8x7B-Instruct-v0.1").startswith("mistralai/")
    with pytest.raises(ConfigError, match="recorded models"):
        resolve_recorded(items, "recorded:claude")


def test_unknown_adapter_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown data set"):
        convert("imagenet", DATA)
    with pytest.raises(ConfigError, match="not found"):
        convert("banking77", tmp_path / "nowhere")
    assert set(ADAPTERS) >= {"banking77", "mmlu", "gsm8k", "mt_bench"}


def test_choice_sets_carry_the_label_first_system_prompt() -> None:
    """`data convert` gives every choice row the prompt that puts the label first (issue 18 part 5);
    the other tasks keep none, and the field round-trips through the JSONL format."""
    from localroute.evaluation.datasets import LABEL_FIRST

    for name in ("banking77", "tweeteval-sentiment", "mmlu", "bbh"):
        items = convert(name, DATA, limit=20, seed=1)
        assert all(it.system == LABEL_FIRST for it in items if it.task == "choice"), name
    assert all(it.system is None for it in convert("gsm8k", DATA, limit=5, seed=1))
    item = convert("tweeteval-sentiment", DATA, limit=1, seed=1)[0]
    assert EvalItem.model_validate(json.loads(item.to_json())).system == LABEL_FIRST
