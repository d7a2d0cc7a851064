"""The eval runner's request for a row: the row's system prompt first, its choices as labels."""

from __future__ import annotations

from pathlib import Path

from localroute.evaluation.datasets import EvalItem
from localroute.evaluation.runner import EvalConfig, _request, with_system

CFG = EvalConfig(dataset=Path("d.jsonl"), out_dir=Path("out"))


def test_system_prompt_comes_first_and_merges_into_an_existing_one() -> None:
    plain = EvalItem(id="a", task="exact", messages=[{"role": "user", "content": "q"}], answer="x", system="S")
    assert with_system(plain) == (({"role": "system", "content": "S"}, {"role": "user", "content": "q"}), None)
    merged = EvalItem(id="b", task="exact", answer="x", system="S",
                      messages=[{"role": "system", "content": "T"}, {"role": "user", "content": "q"}])
    messages, _ = with_system(merged)
    assert messages is not None and messages[0] == {"role": "system", "content": "S\n\nT"} and len(messages) == 2
    prompt = EvalItem(id="c", task="exact", prompt="q", answer="x", system="S")
    assert with_system(prompt) == (None, "S\n\nq")
    assert merged.messages is not None and merged.messages[0]["content"] == "T"  # the row is not changed


def test_choice_rows_name_their_labels() -> None:
    choice = EvalItem(id="c", task="choice", messages=[{"role": "user", "content": "q"}], choices=["a", "b"],
                      answer="a")
    assert _request(CFG, choice).labels == ("a", "b")
    exact = EvalItem(id="e", task="exact", messages=[{"role": "user", "content": "q"}], answer="a")
    assert _request(CFG, exact).labels == ()
