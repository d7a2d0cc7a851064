"""The eval report's comparison with the default signal: the paired AUROC difference of every
signal against mean_logprob, and the bar a set's best signal is held to (issue #18)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from localroute.evaluation.report import bar_verdict, build_report
from localroute.evaluation.runs import append_rows, tokens_to_json, write_meta
from localroute.types import TokenLogprob, TopLogprob


def _tokens(*logprobs: float) -> list[TokenLogprob]:
    return [TokenLogprob(i + 1, f"t{i}", lp, None, (TopLogprob(f"t{i}", lp), TopLogprob("x", lp - 1.0)))
            for i, lp in enumerate(logprobs)]


def _run(tmp_path: Path, rows: list[tuple[list[TokenLogprob], bool]], score: float | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    write_meta(run, {"version": 1, "tier": "cheap", "dataset": str(tmp_path / "none.jsonl"),
                     "frontier": {"mode": "oracle"}, "confidence_quantile_alpha": 0.25})
    with append_rows(run) as append:
        for i, (tokens, right) in enumerate(rows):
            append({"id": str(i), "output": "x", "tokens": tokens_to_json(tokens), "completion_tokens": len(tokens),
                    "cheap": {"score": float(right) if score is None else score, "correct": right},
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
    bar = report["bar"]
    assert {k: bar[k] for k in ("applies", "cheap_right", "best", "met", "paired")} == {
        "applies": True, "cheap_right": 0.5, "best": report["best_aggregator"], "met": True, "paired": True}
    assert bar["compared"] == len(aggs) - 1 and bar["paired_level"] == round(1 - 0.05 / bar["compared"], 4)
    assert bar["paired_ci"][0] > 0.9
    assert "beats mean_logprob's AUROC beyond its 95% interval" in bar_verdict(report, "s")
    assert "excludes 0" in bar_verdict(report, "s")
    plain = build_report(_run(tmp_path / "no-bootstrap", rows))
    assert plain["bar"] is None and "vs_mean_logprob" not in plain["aggregators"]["min_logprob"]
    assert "no bootstrap" in bar_verdict(plain, "s")
    older = {k: v for k, v in report.items() if k != "bar"}  # a report written before the bar
    assert "before the bar existed" in bar_verdict(older, "s")


def test_the_bar_is_not_met_when_the_best_signal_is_inside_mean_logprobs_interval(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(40):  # pure noise: every signal near 0.5, intervals wide
        right = bool(rng.random() < 0.5)
        rows.append((_tokens(*rng.normal(-0.5, 0.2, 3)), right))
    report = build_report(_run(tmp_path, rows), bootstrap=200)
    bar = report["bar"]
    assert bar["applies"] and bar["met"] is False and bar["paired"] is False
    assert "does not beat" in bar_verdict(report, "s") and "includes 0" in bar_verdict(report, "s")
    for name, m in report["aggregators"].items():
        if name != "mean_logprob":
            low, high = m["vs_mean_logprob"]["ci"]
            assert low <= m["vs_mean_logprob"]["delta"] <= high


def test_the_bar_applies_from_a_fifth_right_answers_counted_as_right_not_as_mean_score(tmp_path: Path) -> None:
    rows = [(_tokens(-0.1 * i), i < 2) for i in range(10)]  # 2 of 10 right: exactly the line
    report = build_report(_run(tmp_path / "a", rows), bootstrap=100)
    assert report["bar"]["applies"] is True and report["bar"]["cheap_right"] == 0.2
    rows = [(_tokens(-0.1 * i), i == 0) for i in range(10)]  # 1 of 10
    report = build_report(_run(tmp_path / "b", rows), bootstrap=100)
    assert report["bar"]["applies"] is False and report["bar"]["met"] is None
    assert "right 10.0% of the time" in bar_verdict(report, "s")
    # span F1 of 0.5 on every row: a mean score of 50%, but no answer is right
    run = _run(tmp_path / "c", [(_tokens(-0.1 * i), i == 0) for i in range(10)], score=0.5)
    report = build_report(run, bootstrap=100)
    assert report["cheap_quality"] > 0.2 and report["cheap_right"] == 0.1 and report["bar"]["applies"] is False


def test_the_bar_is_not_met_when_mean_logprob_is_the_best_signal(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rows = []
    for _ in range(15):  # right: higher mean, but a lower minimum, sum and quartile than the wrong ones
        rows.append((_tokens(0.0, 0.0, -0.3, -0.6 + rng.normal(0, 0.01)), True))
        rows.append((_tokens(-0.25, -0.35 + rng.normal(0, 0.01)), False))
    report = build_report(_run(tmp_path, rows), bootstrap=100)
    assert report["best_aggregator"] == "mean_logprob", {a: m["auroc"] for a, m in report["aggregators"].items()}
    assert report["bar"]["met"] is False and report["bar"]["paired"] is False
    assert "mean_logprob is the best signal" in bar_verdict(report, "s")
