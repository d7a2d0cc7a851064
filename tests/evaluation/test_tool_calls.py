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


def test_the_real_tier_answers_every_labelled_prompt_with_a_call_its_schema_accepts() -> None:
    """The measurement on the real SmolLM2 tier: every answer is a call (tool_choice required) whose
    arguments validate against its tool's schema (the grammar's guarantee), and each aggregator's
    AUROC comes with a bootstrap interval around it (README's figures come from this report)."""
    import jsonschema
    import pytest

    from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
    from localroute.evaluation.tool_calls import measure
    from localroute.registry import resolve_model_path
    from localroute.settings import Settings

    settings = Settings()
    engine = LlamaEngine(resolve_model_path("smollm2-135m", settings.models_dir), n_ctx_seq=1024, n_parallel=1,
                         n_threads=settings.n_threads)
    try:
        report = measure(LlamaCppBackend("smollm2-135m", engine))
    finally:
        engine.close()
    schemas = {t["name"]: t["parameters"] for t in TOOLS}
    assert report["n"] == report["calls"] == len(LABELLED)
    for row in report["rows"]:
        jsonschema.validate(row["call"]["arguments"], schemas[row["call"]["name"]])
    if 0 < report["right"] < report["n"]:  # both kinds present: every AUROC is defined
        for name, value in report["auroc"].items():
            low, high = report["auroc_95ci"][name] or pytest.fail(f"{name}: no interval")
            assert 0.0 <= low <= value <= high <= 1.0, (name, value, low, high)
