"""The eval report's comparison with the default signal: the paired AUROC difference of every
signal against mean_logprob, and the bar a set's best signal is held to (issue #18)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from localroute.evaluation.report import build_report
from localroute.evaluation.runs import append_rows, tokens_to_json, write_meta
from localroute.types import TokenLogprob, TopLogprob


def _tokens(*logprobs: float) -> list[TokenLogprob]:
    return [TokenLogprob(i + 1, f"t{i}", lp, None, (TopLogprob(f"t{i}", lp), TopLogprob("x", lp - 1.0)))
            for i, lp in enumerate(logprobs)]


def _run(tmp_path: Path, rows: list[tuple[list[TokenLogprob], bool]]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_meta(run, {"version": 1, "tier": "cheap", "dataset": str(tmp_path / "none.jsonl"),
                     "frontier": {"mode": "oracle"}, "confidence_quantile_alpha": 0.25})
    with append_rows(run) as append:
        for i, (tokens, right) in enumerate(rows):
            append({"id": str(i), "output": "x", "tokens": tokens_to_json(tokens), "completion_tokens": len(tokens),
                    "cheap": {"score": float(right), "correct": right},
                    "frontier": {"score": 1.0, "correct": True, "source": "oracle"}})
    return run


def test_a_signal_that_reads_the_deciding_token_beats_mean_logprob_and_the_report_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(30):  # right answers: every token so-so; wrong ones: confident boilerplate, one bad token
        rows.append((_tokens(-0.5 + rng.normal(0, 0.02), -0.5 + rng.normal(0, 0.02)), True))
        rows.append((_tokens(-0.01, -0.85 + rng.normal(0, 0.02)), False))
    report = build_report(_run(tmp_path, rows), bootstrap=200)
    aggs = report["aggregators"]
    assert aggs["mean_logprob"]["auroc"] == 0.0 and aggs["min_logprob"]["auroc"] == 1.0
    assert "vs_mean_logprob" not in aggs["mean_logprob"]
    delta = aggs["min_logprob"]["vs_mean_logprob"]
    assert delta["delta"] == 1.0 and delta["ci"][0] > 0.9
    assert report["best_aggregator"] != "mean_logprob"
    assert report["bar"] == {"applies": True, "best": report["best_aggregator"], "met": True, "paired": True}
    (tmp_path / "no-bootstrap").mkdir()
    plain = build_report(_run(tmp_path / "no-bootstrap", rows))
    assert plain["bar"] is None and "vs_mean_logprob" not in plain["aggregators"]["min_logprob"]


def test_the_bar_is_not_met_when_the_best_signal_is_inside_mean_logprobs_interval(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(40):  # pure noise: every signal near 0.5, intervals wide
        right = bool(rng.random() < 0.5)
        rows.append((_tokens(*rng.normal(-0.5, 0.2, 3)), right))
    report = build_report(_run(tmp_path, rows), bootstrap=200)
    bar = report["bar"]
    assert bar["applies"] and bar["met"] is False and bar["paired"] is False
    for name, m in report["aggregators"].items():
        if name != "mean_logprob":
            low, high = m["vs_mean_logprob"]["ci"]
            assert low <= m["vs_mean_logprob"]["delta"] <= high


def test_the_bar_does_not_apply_where_the_cheap_tier_is_rarely_right(tmp_path: Path) -> None:
    rows = [(_tokens(-0.1 * i), i == 0) for i in range(10)]  # 10% right
    bar = build_report(_run(tmp_path, rows), bootstrap=100)["bar"]
    assert bar["applies"] is False and bar["met"] is None
