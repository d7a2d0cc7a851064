"""Threshold calibration: the finite-sample guarantee over many random splits, the calibration file
(atomic write, validation) and the fallback rules `serve` applies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from localroute.calibration_file import (
    ESCALATE_ALL,
    CalibrationFile,
    Certificate,
    TierCalibration,
    calibrated_thresholds,
    load_calibration,
    write_calibration,
)
from localroute.errors import ConfigError
from localroute.evaluation.routellm import default_data_dir
from localroute.evaluation.thresholds import (
    certify_quality,
    cp_lower,
    cp_upper,
    escalation_threshold,
    realised,
)

# Synthetic population: conf ~ U(0, 1); the cheap answer is right with probability conf; the frontier
# is right with probability 0.9, independently. Keeping queries with conf >= t gives the exact quality
#   Q(t) = (1 - t^2) / 2 + 0.9 t,   Q_f = 0.9.
QF = 0.9


def true_quality(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return (1 - t * t) / 2 + QF * t


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conf = rng.random(n)
    cheap = (rng.random(n) < conf).astype(float)
    frontier = (rng.random(n) < QF).astype(float)
    return conf, cheap, frontier


def test_clopper_pearson_known_values() -> None:
    # k = 0: the exact upper bound is 1 - delta^(1/n)
    assert cp_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert cp_lower(100, 100, 0.05) == pytest.approx(0.05 ** (1 / 100))
    assert cp_upper(10, 100, 0.05) > 0.1 > cp_lower(10, 100, 0.05)


@pytest.mark.parametrize("target,delta", [(0.9, 0.1), (0.95, 0.05)])
def test_realised_violation_rate_at_most_delta(target: float, delta: float) -> None:
    rng = np.random.default_rng(1234)
    trials, n = 400, 500
    violations, naive_violations, escalation = 0, 0, []
    for _ in range(trials):
        conf, cheap, frontier = draw(rng, n)
        fit = certify_quality(conf, cheap, frontier, target, delta)
        violations += true_quality(fit.threshold) < target * QF
        escalation.append(min(fit.threshold, 1.0))
        # the plug-in rule (lowest threshold whose *empirical* quality meets the target) for contrast
        ts = np.sort(conf)
        ok = [t for t in ts if np.where(conf >= t, cheap, frontier).mean() >= target * frontier.mean()]
        naive_violations += true_quality(min(ok) if ok else 1.0) < target * QF
    rate = violations / trials
    assert rate <= delta, f"violation rate {rate:.3f} > delta {delta}"
    # not vacuous: the certified thresholds keep a real share of queries local ...
    assert np.mean(escalation) < 0.95
    # ... and the test has power: skipping the bound violates far more often than delta
    assert naive_violations / trials > 2 * delta


def test_oracle_frontier_spends_all_of_delta_on_the_loss() -> None:
    rng = np.random.default_rng(0)
    conf, cheap, _ = draw(rng, 400)
    ones = np.ones_like(conf)
    known = certify_quality(conf, cheap, ones, 0.9, 0.05, frontier_known=1.0)
    estimated = certify_quality(conf, cheap, ones, 0.9, 0.05)
    assert known.frontier_lower == 1.0 and estimated.frontier_lower < 1.0
    assert known.threshold <= estimated.threshold  # the known frontier certifies at least as much


def test_tiny_sample_escalates_everything() -> None:
    fit = certify_quality(np.array([0.9, 0.1]), np.array([1.0, 0.0]), np.array([1.0, 1.0]), 0.95, 0.05)
    assert fit.threshold == ESCALATE_ALL


def test_fractional_scores_use_hoeffding() -> None:
    rng = np.random.default_rng(3)
    conf = rng.random(2000)
    fit = certify_quality(conf, conf * 0.9, np.full(2000, 0.8), 0.9, 0.05)
    assert fit.bound == "hoeffding"


def test_escalation_quantile_and_realised() -> None:
    conf = np.array([0.1, 0.2, 0.3, 0.4])
    t = escalation_threshold(conf, 0.25)
    assert t == pytest.approx(0.2)
    r = realised(conf, np.array([0.0, 1.0, 1.0, 1.0]), np.ones(4), t)
    assert r["escalation_rate"] == pytest.approx(0.25) and r["cascade_quality"] == pytest.approx(1.0)
    assert escalation_threshold(conf, 1.0) == ESCALATE_ALL


# ---------------------------------------------------------------- the file


def _file(threshold: float = -0.7, aggregator: str = "mean_logprob", sha: str = "a" * 64) -> CalibrationFile:
    entry = TierCalibration(
        threshold=threshold, model_file="m.gguf", model_sha256=sha, template_sha256="t" * 64,
        certificate=Certificate(target="escalation", target_value=0.25, n_calibration=10, n_holdout=10),
        confidence_quantiles={"p50": -0.5}, confidence_histogram={"edges": [0.0, 1.0], "counts": [10.0]}, n=10,
    )
    return CalibrationFile(created_at="2025-01-01T00:00:00+00:00", aggregator=aggregator, alpha=0.1,
                           tiers={"cheap": entry})


FP = {"cheap": {"model_sha256": "a" * 64, "template_sha256": "t" * 64, "remote_model": None}}


def test_atomic_write_and_round_trip(tmp_path: Path) -> None:
    path = write_calibration(_file(), tmp_path / "cal" / "calibration.json")
    assert load_calibration(path).tiers["cheap"].threshold == -0.7
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary left behind
    assert calibrated_thresholds(path, "mean_logprob", 0.1, FP) == {"cheap": -0.7}


@pytest.mark.parametrize(
    "content,reason",
    [("{not json", "cannot read"), (json.dumps({"version": 1}), "invalid calibration file")],
)
def test_invalid_file_warns_and_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str,
                                          reason: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_calibration(path)
    with caplog.at_level(logging.WARNING, logger="localroute.calibration_file"):
        assert calibrated_thresholds(path, "mean_logprob", 0.1, FP) == {}
    assert "CALIBRATION IGNORED" in caplog.text and reason in caplog.text


def test_mismatches_warn_and_fall_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_calibration(_file(), tmp_path / "calibration.json")
    with caplog.at_level(logging.WARNING, logger="localroute.calibration_file"):
        assert calibrated_thresholds(path, "min_logprob", 0.1, FP) == {}
        assert "aggregator" in caplog.text
        caplog.clear()
        other_model = {"cheap": dict(FP["cheap"], model_sha256="b" * 64)}
        assert calibrated_thresholds(path, "mean_logprob", 0.1, other_model) == {}
        assert "model file hash" in caplog.text
        caplog.clear()
        other_template = {"cheap": dict(FP["cheap"], template_sha256="x" * 64)}
        assert calibrated_thresholds(path, "mean_logprob", 0.1, other_template) == {}
        assert "chat template changed" in caplog.text
    with caplog.at_level(logging.WARNING, logger="localroute.calibration_file"):
        quant = write_calibration(_file(aggregator="quantile_logprob"), tmp_path / "q.json")
        assert calibrated_thresholds(quant, "quantile_logprob", 0.2, FP) == {}
        assert calibrated_thresholds(quant, "quantile_logprob", 0.1, FP) == {"cheap": -0.7}


def test_a_file_of_another_aggregator_is_ignored_loudly_with_both_fixes(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A file fitted on mean_logprob (the old default) under the label_confidence default: a WARNING
    naming the file, both aggregators and the two fixes; calibration_check (doctor) says the same."""
    from localroute.calibration_file import calibration_check

    path = write_calibration(_file(aggregator="mean_logprob"), tmp_path / "old.json")
    with caplog.at_level(logging.WARNING, logger="localroute.calibration_file"):
        assert calibrated_thresholds(path, "label_confidence", 0.1, FP) == {}
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    text = warning[0].getMessage()
    for part in (str(path), "'mean_logprob'", "'label_confidence'", 'confidence_aggregator = "mean_logprob"',
                 "recalibrate", "localroute calibrate"):
        assert part in text, part
    check = calibration_check(path, "label_confidence", 0.1)
    assert check["applies"] is False and check["aggregator"] == "mean_logprob" and check["problem"] == text.split(": ", 1)[1]
    assert calibration_check(path, "mean_logprob", 0.1) | {"problem": None} == {
        "path": str(path), "configured_aggregator": "mean_logprob", "aggregator": "mean_logprob",
        "tiers": ["cheap"], "applies": True, "problem": None}
    assert calibration_check(tmp_path / "absent.json", "mean_logprob", 0.1)["applies"] is False


@pytest.mark.slow
@pytest.mark.skipif(not (default_data_dir() / "routellm").is_dir(), reason="shared RouteLLM data absent")
def test_router_threshold_from_an_eval_run_is_certified_and_served_only_for_its_artefact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """RouteLLM's recorded MMLU outcomes (Mixtral cheap, GPT-4 frontier): a classifier router
    trained on one slice, an eval run made of another, `localroute calibrate --router` on it."""
    from localroute.cli import main
    from localroute.embeddings import load_encoder
    from localroute.evaluation.routellm import load_routellm
    from localroute.routing.artifacts import save_artifact
    from localroute.routing.classifier import train_classifier
    from localroute.routing.prerouter import calibrated_router_threshold, load_models
    from localroute.settings import Settings

    data = load_routellm("mmlu")
    order = np.random.default_rng(1).permutation(len(data.texts))
    train, held = order[:300], order[300:700]
    enc = load_encoder("minilm")
    art = save_artifact(train_classifier(enc.encode([data.texts[i] for i in train]), data.labels[train],
                                         data.tiers, "minilm", c=1.0), tmp_path / "clf.npz")
    dataset, run = tmp_path / "items.jsonl", tmp_path / "run"
    run.mkdir()
    dataset.write_text("\n".join(json.dumps({"id": f"q{i}", "task": "exact", "prompt": data.texts[i], "answer": "x"})
                                 for i in held))
    (run / "meta.json").write_text(json.dumps({"dataset": str(dataset), "tier": "mixtral",
                                               "frontier": {"mode": "recorded", "model": "gpt-4"}}))
    (run / "rows.jsonl").write_text("\n".join(json.dumps({
        "id": f"q{i}", "cheap": {"score": float(data.labels[i, 0])}, "frontier": {"score": float(data.labels[i, 1])}})
        for i in held))
    cal = tmp_path / "calibration.json"
    monkeypatch.setenv("LOCALROUTE_ROUTER_CLASSIFIER_PATH", str(art))
    monkeypatch.setenv("LOCALROUTE_CALIBRATION_PATH", str(cal))
    target = 0.9
    assert main(["calibrate", "--router", "--run", str(run), "--target-quality", str(target), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cert = result["certificate"]
    assert result["routers"] == ["classifier"] and not result["escalate_all"]
    # what the bound certifies holds on the calibration rows themselves (deterministically so)
    assert result["calibration_split"]["cascade_quality"] >= target * cert["frontier_quality_lower"] - 1e-9
    assert 0 < result["calibration_split"]["escalation_rate"] < 1  # some queries really stay cheap
    assert cert["holdout"]["n"] == 200
    stored = load_calibration(cal).router
    assert stored is not None and stored.threshold == result["threshold"]

    settings = Settings()
    models, _ = load_models(settings)
    assert calibrated_router_threshold(settings, models) == result["threshold"]
    # another artefact at the same path: the stored threshold no longer applies
    save_artifact(train_classifier(enc.encode([data.texts[i] for i in train[:100]]), data.labels[train[:100]],
                                   data.tiers, "minilm", c=0.1), art)
    models, _ = load_models(settings)
    with caplog.at_level("WARNING"):
        assert calibrated_router_threshold(settings, models) == settings.router_threshold
    assert "ROUTER CALIBRATION IGNORED" in caplog.text


def test_confidence_distribution_is_what_the_file_keeps() -> None:
    from localroute.calibration_file import QUANTILE_LEVELS, confidence_distribution

    values = np.array([-3.0, -2.0, -1.0, 0.0, float("-inf")])
    quantiles, histogram = confidence_distribution(values)
    assert list(quantiles) == ["p01", "p05", "p10", "p25", "p50", "p75", "p90", "p95", "p99"]
    assert quantiles["p50"] == -1.5 and histogram["non_finite"] == [1.0] and sum(histogram["counts"]) == 4
    entry = TierCalibration(threshold=-1.0, template_sha256="t", n=4, confidence_quantiles=quantiles,
                            confidence_histogram=histogram,
                            certificate=Certificate(target="escalation", target_value=0.5, n_calibration=4,
                                                    n_holdout=0))
    by_level = entry.quantiles()
    assert list(by_level) == list(QUANTILE_LEVELS) and by_level[0.5] == -1.5 and by_level[0.01] == quantiles["p01"]
    assert confidence_distribution([float("-inf")]) == ({}, {"edges": [], "counts": []})


def test_quantiles_other_than_the_written_ones_are_invalid(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"created_at": "now", "aggregator": "mean_logprob", "alpha": 0.1, "tiers": {"cheap": {
        "threshold": -1.0, "template_sha256": "t", "n": 1, "confidence_quantiles": {"median": -0.5},
        "confidence_histogram": {}, "certificate": {"target": "escalation", "target_value": 0.5,
                                                    "n_calibration": 1, "n_holdout": 0}}}}))
    with pytest.raises(ConfigError, match="tiers.cheap.confidence_quantiles"):
        load_calibration(path)


def test_category_thresholds_are_served_only_when_certified_and_the_tier_matches(tmp_path: Path) -> None:
    from localroute.calibration_file import (
        CategoryCalibration,
        calibrated_category_thresholds,
        quality_targets,
    )

    cal = _file()
    cert = Certificate(target="quality", target_value=0.9, delta=0.05, n_calibration=50, n_holdout=0)
    cal.tiers["cheap"].categories = {
        "math": CategoryCalibration(threshold=-0.2, certificate=cert, n=50),
        "tiny": CategoryCalibration(threshold=-0.7, certificate=cert, n=3, fallback="pooled: 3 rows < 30"),
        # an older log refit that "certified" escalating everything: never served (it would stop the
        # shadowing that could ever lift it)
        "stuck": CategoryCalibration(threshold=ESCALATE_ALL, certificate=cert, n=40, source="log"),
    }
    path = write_calibration(cal, tmp_path / "calibration.json")
    assert load_calibration(path).tiers["cheap"].categories["tiny"].fallback == "pooled: 3 rows < 30"
    assert calibrated_category_thresholds(path, "mean_logprob", 0.1, FP) == {"cheap": {"math": -0.2}}
    changed = {"cheap": {**FP["cheap"], "model_sha256": "b" * 64}}
    assert calibrated_category_thresholds(path, "mean_logprob", 0.1, changed) == {}
    assert quality_targets(load_calibration(path)) == {"math": 0.9, "tiny": 0.9, "stuck": 0.9}
