"""The labelled tool-call set's scoring rule (the measurement itself: python -m localroute.evaluation.tool_calls)."""

from __future__ import annotations

from localroute.evaluation.tool_calls import LABELLED, TOOLS, is_right


def test_a_call_is_right_when_name_and_expected_arguments_match() -> None:
    want = {"city": "New York"}
    assert is_right("get_time", {"city": "new  york"}, "get_time", want)
    assert is_right("get_weather", {"city": "Oslo", "unit": "celsius"}, "get_weather", {"city": "Oslo"})
    assert not is_right("get_weather", {"city": "New York"}, "get_time", want)
    assert not is_right("get_time", {}, "get_time", want)
    assert is_right("add", {"a": 2.0, "b": 3}, "add", {"a": 2, "b": 3})
    assert not is_right("add", {"a": True, "b": 3}, "add", {"a": 1, "b": 3})


def test_every_label_names_a_tool_and_its_parameters() -> None:
    params = {t["name"]: set(t["parameters"]["properties"]) for t in TOOLS}
    assert 10 <= len(LABELLED) <= 20
    for _, name, args in LABELLED:
        assert set(args) <= params[name]
