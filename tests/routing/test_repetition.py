"""The repetition check on hand-built answers: loops it must catch, normal answers it must not."""

from __future__ import annotations

import json

import pytest

from localroute.routing.repetition import RepetitionCheck, find_repetition

LOOPS = {
    # issue 13's answer to "What is the capital of France?", as decoded to max_tokens
    "la_femme": "la Femme, " * 20 + "la",
    "one_word": "Paris Paris Paris Paris Paris Paris",
    "sentence": "The answer is positive. " + "I hope this helps. " * 6,
    # gemma-3-270m base continuing the role-prefixed prompt (issue 13)
    "role_loop": " 19th century\n" + "user: What is the capital of France?\nassistant: 19th century\n" * 4,
    "tail_loop": "Paris is the capital and largest city of France. It is known for the Eiffel Tower, "
                 + "the Eiffel Tower, " * 8,
    "case_only": "Yes. yes. YES. Yes. yes. Yes.",
    "newlines": "negative\nnegative\nnegative\nnegative\nnegative",
}

NORMAL = {
    "short": "Paris.",
    "numbered_list": "\n".join(f"{i}. Step {i}: mix the {w}" for i, w in enumerate(
        ["flour", "eggs", "milk", "sugar", "butter", "salt"], 1)),
    "bullets": "- red\n- green\n- blue\n- yellow\n- purple\n- orange",
    "code": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "def mul(a, b):\n    return a * b\n\nprint(add(1, 2), sub(3, 4), mul(5, 6))\n",
    "json_array": json.dumps([{"id": i, "name": n, "ok": True} for i, n in enumerate("abcdef")]),
    "json_numbers": json.dumps(list(range(40))),
    "markdown_table": "| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |\n| 4 | 5 | 6 |",
    "closing_braces": '{"a": {"b": {"c": {"d": {"e": 1}}}}}',
    "rule_and_dots": "Result ----------------------------------------------- done ...........",
    "prose": "The cat sat on the mat. The dog sat on the rug. The bird sat on the branch and sang.",
    "short_echo": "very very good",
    "math": "4 + 4 = 8, 8 + 8 = 16, 16 + 16 = 32, 32 + 32 = 64. #### 64",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loops_are_caught_with_their_evidence(name: str) -> None:
    found = find_repetition(LOOPS[name])
    assert found is not None, name
    assert found.repeats >= 4 and 0.3 <= found.coverage <= 1.0
    assert found.ngram.strip() and found.ngram.casefold() in LOOPS[name].casefold()


def test_the_evidence_names_the_repeated_phrase() -> None:
    found = find_repetition(LOOPS["la_femme"])
    assert found is not None and found.ngram == "la Femme," and found.repeats == 20
    assert found.as_evidence() == {"ngram": "la Femme,", "repeats": 20, "coverage": found.as_evidence()["coverage"]}
    assert found.coverage > 0.95
    role = find_repetition(LOOPS["role_loop"])
    assert role is not None and "user: What is the capital of France?" in role.ngram


@pytest.mark.parametrize("name", sorted(NORMAL))
def test_normal_answers_do_not_trip_it(name: str) -> None:
    assert find_repetition(NORMAL[name]) is None, find_repetition(NORMAL[name])


def test_thresholds_set_the_strictness() -> None:
    three = "la Femme, la Femme, la Femme,"
    assert find_repetition(three) is None  # three repeats: below the default of four
    assert find_repetition(three, min_repeats=3) is not None
    tail = LOOPS["tail_loop"]
    assert find_repetition(tail, min_coverage=0.9) is None  # the loop is only part of this answer
    assert RepetitionCheck(min_repeats=0).find(LOOPS["la_femme"]) is None  # 0: off
    assert RepetitionCheck().find(LOOPS["la_femme"]) == find_repetition(LOOPS["la_femme"])
