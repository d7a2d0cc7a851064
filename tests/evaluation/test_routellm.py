"""Routers trained on RouteLLM's recorded outcomes, evaluated on held-out rows with RouteLLM's
metrics. (The eval-run source is tested in test_runs.py, the routing log's in test_feedback.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localroute.embeddings import load_encoder
from localroute.evaluation.routellm import (
    Scored,
    default_data_dir,
    evaluate_scores,
    load_routellm,
    markdown,
    metrics_for,
    score_router,
)

needs_data = pytest.mark.skipif(not (default_data_dir() / "routellm").is_dir(), reason="shared RouteLLM data absent")


@needs_data
def test_loader_excludes_contaminated_prompts() -> None:
    data = load_routellm("gsm8k")
    bad = {json.loads(line)["eval_prompt"].strip() for line in
           (default_data_dir() / "routellm/gsm8k/contaminated_prompts.jsonl").read_text().splitlines()}
    assert len(data.texts) == 1319 - data.skipped and data.skipped >= len(bad) > 0
    assert not bad & set(data.texts)
    assert data.tiers == ["mixtral-8x7b", "gpt-4-1106"]
    assert set(np.unique(data.labels)) <= {0.0, 1.0}
    mt = load_routellm("mt_bench")
    assert 0 < len(mt.texts) <= 80 and (mt.labels >= 0).all() and (mt.labels <= 1).all()


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "embedding"])
def test_trained_router_beats_random_on_heldout_mmlu(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Train on a random slice of MMLU, evaluate on a disjoint slice: the router's APGR must beat the
    95th percentile of 300 random routers' APGR on the same held-out rows. (On a 500-row held-out
    slice random APGR spreads by +-0.1, too wide to separate a real router; 1,500 rows suffice.)"""
    data = load_routellm("mmlu")
    idx = np.random.default_rng(0).permutation(len(data.texts))
    train, test = data.subset(idx[:2000]), data.subset(idx[2000:3500])
    cache = tmp_path_factory.getbasetemp() / "mmlu-embeddings"  # both kinds embed the same rows once
    conf = score_router(kind, load_encoder("minilm"), train, test, cache_dir=cache)
    weak, strong = test.labels[:, 0], test.labels[:, 1]
    ours = metrics_for(conf, weak, strong)["apgr"]
    rng = np.random.default_rng(1)
    randoms = [metrics_for(rng.random(len(weak)), weak, strong)["apgr"] for _ in range(300)]
    assert ours is not None and ours > float(np.percentile(randoms, 95)), (ours, np.percentile(randoms, 95))


def test_metrics_order_oracle_router_random() -> None:
    rng = np.random.default_rng(0)
    n = 400
    hard = rng.random(n) < 0.4
    weak = (~hard | (rng.random(n) < 0.2)).astype(np.float32)
    strong = (rng.random(n) < 0.9).astype(np.float32)
    informative = np.where(hard, 0.2, 0.8) + 0.1 * rng.random(n)
    res = evaluate_scores([Scored("router", informative)], np.stack([weak, strong], 1), bootstrap=50)
    r, rand, orc = (res[k]["point"]["apgr"] for k in ("router", "random", "oracle"))
    assert orc > r > rand
    lo, hi = res["random"]["ci95"]["apgr"]["lo"], res["random"]["ci95"]["apgr"]["hi"]
    assert lo < 0.5 < hi
    assert res["router"]["point"]["cpt50"] < res["random"]["point"]["cpt50"]


def test_markdown_report_has_published_figures_and_source() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 2)) < [0.6, 0.9]).astype(np.float32)
    res = evaluate_scores([Scored("classifier/minilm", rng.random(50))], labels, bootstrap=10)
    res["_rows"].update({"train": 50, "test": 50, "benchmark": "mmlu"})
    from localroute.evaluation.routellm import PUBLISHED, PUBLISHED_SOURCE

    report = {"pair": {"weak": "w", "strong": "s"}, "excluded_contaminated_and_malformed": {}, "bootstrap": 10,
              "created_at": "now", "experiments": {"mmlu_heldout": res},
              "published": {"source": PUBLISHED_SOURCE, "figures": PUBLISHED, "note": "other data"}}
    md = markdown(report)
    assert "2406.18665" in md and "| mf | 0.597 |" in md and "classifier/minilm" in md and "oracle" in md


@needs_data
def test_cli_train_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localroute.cli import main

    out = tmp_path / "emb.npz"
    assert main(["train", "--from-routellm", "mt_bench", "--kind", "embedding", "--encoder", "minilm",
                 "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == len(load_routellm("mt_bench").texts) and info["kind"] == "embedding"
    assert main(["routers", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["training"]["source"] == "routellm:mt_bench" and shown["dim"] == 384
