"""The eval-run folder's one reader and writer: what `localroute eval` appends reads back as it was
written, a torn line is left for the resume, and the readers above it (the report's table, the
training source) see the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localroute.errors import ConfigError
from localroute.evaluation.runs import (
    META_FILE,
    ROWS_FILE,
    TOP_LOGPROBS,
    RunTable,
    append_rows,
    from_eval_run,
    read_meta,
    read_rows,
    tokens_from_json,
    tokens_to_json,
    write_meta,
)
from localroute.routing.confidence import AGGREGATORS, SIGNALS, TOP_K_NEEDED, confidence
from localroute.types import TokenLogprob, TopLogprob

TOKENS = [
    TokenLogprob(7, "Hi", -0.25, None, (TopLogprob("Hi", -0.25), TopLogprob("Hello", -1.75))),
    TokenLogprob(9, " there", -1e-7, None, ()),
]


def _row(rid: str, cheap: float | None, **extra: object) -> dict[str, object]:
    return {"id": rid, "output": "Hi there", "tokens": tokens_to_json(TOKENS),
            "cheap": None if cheap is None else {"score": cheap, "correct": cheap >= 0.5},
            "frontier": {"score": 1.0, "correct": True, "source": "oracle"}, "completion_tokens": 2, **extra}


def _run(tmp_path: Path, rows: list[dict[str, object]], dataset: Path | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_meta(run, {"version": 1, "tier": "cheap", "dataset": str(dataset or tmp_path / "none.jsonl"),
                     "frontier": {"mode": "oracle"}, "confidence_quantile_alpha": 0.25})
    with append_rows(run) as append:
        for r in rows:
            append(r)
    return run


def test_tokens_round_trip_exactly() -> None:
    back = tokens_from_json(json.loads(json.dumps(tokens_to_json(TOKENS))))
    assert back == TOKENS  # floats survive JSON bit for bit: rescoring sees what the engine returned


def test_every_aggregator_finds_the_alternatives_it_needs() -> None:
    assert TOP_LOGPROBS >= max(TOP_K_NEEDED.values())


def test_rows_read_back_and_a_torn_line_is_left_for_the_resume(tmp_path: Path) -> None:
    run = _run(tmp_path, [_row("a", 1.0), _row("b", 0.0)])
    with (run / ROWS_FILE).open("a") as fh:
        fh.write('{"id": "c", "cheap": ')  # killed mid-write
    assert [r["id"] for r in read_rows(run)] == ["a", "b"]
    assert read_rows(tmp_path) == []  # not a run yet: nothing done
    assert read_meta(run)["tier"] == "cheap"


def test_meta_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an eval run"):
        read_meta(tmp_path)
    (tmp_path / META_FILE).write_text("{half")
    with pytest.raises(ConfigError, match="cannot read"):
        read_meta(tmp_path)
    (tmp_path / META_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        read_meta(tmp_path)


def test_run_table_rescores_every_aggregator_from_the_stored_tokens(tmp_path: Path) -> None:
    run = _run(tmp_path, [_row("a", 1.0), _row("b", 0.0), _row("c", None),
                          {**_row("d", 0.0), "output": "", "tokens": [], "error": "generation: engine_dead: x"}])
    t = RunTable(run)
    assert t.n == 3 and t.n_excluded == 1 and t.generation_errors == 1 and t.alpha == 0.25
    assert t.cheap.tolist() == [1.0, 0.0, 0.0] and t.correct.tolist() == [True, False, False]
    assert set(t.conf) == set(AGGREGATORS) | set(SIGNALS)
    for name, values in t.conf.items():  # no labels, no structure: the two signals are mean_logprob here
        expected = confidence("mean_logprob" if name in SIGNALS else name, TOKENS, 0.25)
        assert values[0] == values[1] == expected
        assert values[2] == float("-inf")  # the failed generation: no evidence, escalated
    assert t.upper_bound


def test_eval_run_source_skips_malformed_rows(tmp_path: Path) -> None:
    dataset = tmp_path / "items.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "task": "exact", "messages": [{"role": "user", "content": "What is 1+1?"}], "answer": "2"},
        {"id": "b", "task": "exact", "prompt": "Capital of Peru?", "answer": "Lima"},
    ]))
    run = tmp_path / "run"
    run.mkdir()
    (run / META_FILE).write_text(json.dumps({"dataset": str(dataset), "tier": "smollm2-135m"}))
    (run / ROWS_FILE).write_text("\n".join([
        json.dumps({"id": "a", "cheap": {"score": 1.0, "correct": True}, "frontier": {"score": 1.0}}),
        json.dumps({"id": "b", "cheap": {"score": 0.0, "correct": False}, "frontier": None}),
        '{"id": "c", "cheap": ',  # torn line
        json.dumps({"id": "zzz", "cheap": {"score": 1.0}}),  # no text for this id
    ]))
    data = from_eval_run(run)
    assert data.texts == ["What is 1+1?", "Capital of Peru?"] and data.tiers == ["smollm2-135m", "frontier"]
    assert data.labels[0].tolist() == [1.0, 1.0] and data.labels[1, 0] == 0.0 and np.isnan(data.labels[1, 1])
    assert data.skipped == 2 and data.ids == ["a", "b"]
    with pytest.raises(ConfigError, match="not an eval run"):
        from_eval_run(tmp_path)


def test_field_confidence_is_rescored_on_the_tiers_confidence_fields(tmp_path: Path) -> None:
    """serve decides field_confidence on the tier's confidence_fields; calibrate must rescore the
    run the same way, or the threshold is fitted on another signal."""
    from localroute.evaluation.thresholds import calibrate_run
    from localroute.routing.confidence import field_confidence

    toks = [TokenLogprob(i, t, lp) for i, (t, lp) in enumerate(
        [('{"', 0.0), ("label", 0.0), ('": "', 0.0), ("pos", -0.1), ('", "', 0.0), ("why", 0.0), ('": "', 0.0),
         ("meh", -3.0), ('"}', 0.0)])]
    text = "".join(t.token for t in toks)
    rows = [{**_row(f"r{i}", 1.0 if i % 2 else 0.0), "output": text, "tokens": tokens_to_json(toks)}
            for i in range(6)]
    run = _run(tmp_path, rows)
    every, label_only = RunTable(run).conf["field_confidence"][0], RunTable(run, ("label",)).conf["field_confidence"][0]
    assert every == field_confidence(toks) and label_only == field_confidence(toks, (), ("label",))
    assert label_only > every  # the `why` field no longer drags it down
    write_meta(run, {**read_meta(run), "fingerprint": {"template_sha256": "x"}})
    out = tmp_path / "cal.json"
    result = calibrate_run(run, out, "field_confidence", target_escalation=0.0, holdout=0.0,
                           tier_fields={"cheap": ("label",)})
    assert result["threshold"] == pytest.approx(label_only)
