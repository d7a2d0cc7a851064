"""Label confidence's engine-free part: where the label sits, its candidates, normalisation, and
the plan that scores shared label prefixes once. The engine's scoring is in test_llama_cpp.py."""

from __future__ import annotations

import math

import pytest

from localroute.backends.labels import (
    LabelPlan,
    enum_field,
    labels_from_metadata,
    labels_of,
    locate_label,
    normalise,
)

SENTIMENT = ("negative", "neutral", "positive")
SCHEMA = {"type": "json_schema", "json_schema": {"name": "s", "schema": {
    "type": "object", "properties": {"reason": {"type": "string"}, "label": {"type": "string", "enum": list(SENTIMENT)}}}}}


@pytest.mark.parametrize(("text", "label", "start", "surface"), [
    ("negative", "negative", 0, "negative"),
    ("Positive.", "positive", 0, "Positive"),
    ("The sentiment of this tweet is neutral, as", "neutral", 31, "neutral"),
    ("  NEGATIVE", "negative", 2, "NEGATIVE"),
])
def test_locate_label_in_free_text(text: str, label: str, start: int, surface: str) -> None:
    span = locate_label(text, SENTIMENT)
    assert span is not None and span.label == label and span.start == start
    assert text[span.start:span.end] == surface
    cands = dict(span.candidates)
    assert cands[label] == surface  # the chosen label as written; the others in the same case
    assert cands["neutral" if label != "neutral" else "positive"][0].isupper() == surface[0].isupper()


def test_locate_letter_labels() -> None:
    span = locate_label("B. because", ("A", "B", "C", "D"))
    assert span is not None and span.label == "B" and span.start == 0 and dict(span.candidates)["C"] == "C"
    span = locate_label("Answer: (C)", ("(A)", "(B)", "(C)"))
    assert span is not None and span.label == "(C)" and "Answer: (C)"[span.start:span.end] == "(C)"


def test_longest_label_that_starts_the_answer_wins() -> None:
    labels = ("card_payment", "card_payment_fee_charged")
    span = locate_label("card_payment_fee_charged", labels)
    assert span is not None and span.label == "card_payment_fee_charged"


def test_locate_label_in_a_json_enum_value_keeps_the_closing_quote() -> None:
    text = '{"reason": "great", "label": "positive"}'
    span = locate_label(text, SENTIMENT, SCHEMA)
    assert span is not None and span.label == "positive" and text[span.start:span.end] == "positive"
    assert dict(span.candidates) == {lab: lab + '"' for lab in SENTIMENT}
    assert locate_label('{"label": "other"}', SENTIMENT, SCHEMA) is None


def test_no_label_named() -> None:
    assert locate_label("I cannot tell.", SENTIMENT) is None
    assert locate_label("anything", ()) is None


def test_labels_from_the_request() -> None:
    assert enum_field(SCHEMA) == ("label", SENTIMENT)
    assert enum_field({"type": "json_object"}) is None
    assert labels_of((), SCHEMA) == SENTIMENT and labels_of(("a", "b"), SCHEMA) == ("a", "b")
    assert labels_from_metadata({"labels": '["yes", "no"]'}) == ("yes", "no")
    assert labels_from_metadata({"labels": "a|b|c"}) == ("a", "b", "c")
    assert labels_from_metadata({"labels": "only"}) == () and labels_from_metadata(None) == ()


def test_normalise_over_the_allowed_labels() -> None:
    raw = {"a": math.log(0.2), "b": math.log(0.05), "c": math.log(0.05)}  # 0.3 of the mass in all
    assert normalise(raw, "a") == pytest.approx(math.log(0.2 / 0.3))
    assert normalise(raw, "b") == pytest.approx(math.log(0.05 / 0.3))
    assert sum(math.exp(normalise(raw, k)) for k in raw) == pytest.approx(1.0)
    assert normalise(raw, "zzz") == -math.inf
    assert normalise({"a": -1.0}, "a") == 0.0  # one label: certain


def test_label_plan_feeds_each_shared_prefix_once_and_never_one_token_alone() -> None:
    """card_arrival / card_linking share `card _`; after the context's last two tokens (8, 9) each
    label's tokens but its last are fed, the cache keeps what it holds, and a step that would feed
    one token feeds the one before it again (llama.cpp's one-token path changes the numbers)."""
    plan = LabelPlan(base=100, root=(8, 9), paths=(("card_arrival", (5, 6, 7)), ("card_linking", (5, 6, 3, 1)),
                                                   ("cash", (4,)), ("card", (5, 6))))
    feeds = plan.feeds()
    # card_arrival needs no step: the row after `card _` came with card_linking's
    assert feeds == [(0, (8, 9)), (1, (8, 9, 5)), (3, (8, 9, 5, 6, 3))]
    assert all(len(need) - keep >= 2 for keep, need in feeds)


@pytest.mark.parametrize("labels,why", [([f"l{i}" for i in range(300)], "300 labels"),
                                        (["a" * 5000, "b" * 5000], "10000 characters")])
def test_too_many_or_too_long_labels_are_refused(labels: list[str], why: str) -> None:
    import json

    from localroute.backends.labels import MAX_LABELS, MAX_LABELS_CHARS, labels_from_metadata, labels_of
    from localroute.errors import InvalidRequestError

    assert len(labels) > MAX_LABELS or sum(map(len, labels)) > MAX_LABELS_CHARS, why
    with pytest.raises(InvalidRequestError) as exc:
        labels_from_metadata({"labels": json.dumps(labels)})
    assert exc.value.param == "metadata.labels"
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": labels}}}}}
    with pytest.raises(InvalidRequestError) as exc:
        labels_of((), fmt)
    assert exc.value.param == "response_format.json_schema.schema.properties.label.enum"
