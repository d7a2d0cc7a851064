"""eval -> calibrate -> serve with the real SmolLM2 model on 12 labelled items: from the committed
fixture (tests/fixtures/sentiment.jsonl) everywhere, and from the staged TweetEval data as well
where that folder exists.

The frontier tier is a scripted OpenAI-compatible app on 127.0.0.1 (it only has to answer when a
request escalates); the cheap tier is the real GGUF through llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from openai import OpenAI

from localroute.calibration_file import load_calibration, write_calibration
from localroute.cli import main
from localroute.errors import ConfigError
from localroute.evaluation.datasets import convert, load_items, sample, write_items
from localroute.evaluation.report import build_report
from localroute.evaluation.runner import EvalConfig, run_eval
from localroute.evaluation.runs import read_rows
from localroute.server.app import create_app
from localroute.service import build_tiers
from localroute.settings import Settings
from tests.conftest import SENTIMENT_FIXTURE, local_settings, serve_app

pytestmark = pytest.mark.slow

DATA = Settings().eval_data_dir


def frontier_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-frontier", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }

    return app


def settings_for(frontier_url: str, **kw: Any) -> Settings:
    return local_settings(
        tiers=[
            {"name": "cheap", "model": "smollm2-135m"},
            {"name": "frontier", "kind": "openai", "model": "scripted", "base_url": frontier_url},
        ],
        **kw,
    )


@pytest.mark.parametrize("source", [
    "fixture",
    pytest.param("tweeteval", marks=pytest.mark.skipif(not DATA.is_dir(), reason=f"staged data not found at {DATA}")),
])
def test_eval_calibrate_serve_round_trip(source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    dataset = tmp_path / "items.jsonl"
    if source == "fixture":
        write_items(sample(load_items(SENTIMENT_FIXTURE), 12, 7), dataset)
    else:
        write_items(convert("tweeteval-sentiment", DATA, limit=12, seed=7), dataset)
    assert len(dataset.read_text().splitlines()) == 12
    run = tmp_path / "run"
    with serve_app(frontier_app()) as frontier_url:
        settings = settings_for(frontier_url)

        # 1. an interrupted run (6 of 12 items), then the full run resumes without recomputing
        cfg = EvalConfig(dataset=dataset, out_dir=run, limit=6, max_tokens=8, progress=False)
        first = asyncio.run(run_eval(settings, cfg))
        assert (first.computed, first.skipped) == (6, 0)
        head = (run / "rows.jsonl").read_text().splitlines()
        cfg.limit = None
        second = asyncio.run(run_eval(settings, cfg))
        assert (second.total, second.computed, second.skipped) == (12, 6, 6)
        lines = (run / "rows.jsonl").read_text().splitlines()
        assert lines[:6] == head and len(lines) == 12
        again = asyncio.run(run_eval(settings, cfg))
        assert again.computed == 0
        with pytest.raises(ConfigError, match="different run"):
            asyncio.run(run_eval(settings, EvalConfig(dataset=dataset, out_dir=run, max_tokens=9, progress=False)))

        rows = read_rows(run)
        assert {r["id"] for r in rows} == {json.loads(x)["id"] for x in dataset.read_text().splitlines()}
        for r in rows:
            # a stop string's tokens are counted (and paid) but are not the answer's
            assert 0 < r["completion_tokens"] <= 8 and 0 < len(r["tokens"]) <= r["completion_tokens"]
            assert r["finish_reason"] == "stop" or len(r["tokens"]) == r["completion_tokens"]
            assert all(len(t[3]) == 5 for t in r["tokens"])  # top-5 kept for rescoring
            assert r["frontier"] == {"score": 1.0, "correct": True, "source": "oracle"}
            assert r["cost_usd"] > 0 and r["cost_inputs"]["method"] == "local_cpu" and r["cost_inputs"]["cpu_s"] > 0

        # 2. the report (through the CLI): every aggregator rescored from the stored tokens
        assert main(["eval", "--run", str(run), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["n"] == 12 and report["upper_bound"] is True and report["frontier_quality"] == 1.0
        assert set(report["aggregators"]) >= {"mean_logprob", "min_logprob", "mean_margin"}
        for m in report["aggregators"].values():
            assert set(m) >= {"auroc", "ece", "apgr", "cpt50", "cpt80", "cpt95"}
        assert report == {**build_report(run), "run": str(run)}
        assert (run / "deferral.png").stat().st_size > 1000 and "upper bound" in (run / "report.md").read_text()

        # 3. calibrate (a quantile target: 12 rows certify nothing but "escalate everything")
        cal_path = tmp_path / "calibration.json"
        assert main(["calibrate", "--run", str(run), "--target-escalation", "0.5", "--holdout", "0.25",
                     "--out", str(cal_path), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        threshold = result["threshold"]
        assert -20 < threshold <= 0 and result["certificate"]["holdout"]["n"] == 3
        cal = load_calibration(cal_path)
        assert cal.aggregator == Settings().confidence_aggregator and cal.tiers["cheap"].threshold == threshold
        assert cal.tiers["cheap"].model_sha256 and cal.tiers["cheap"].confidence_quantiles["p50"] <= 0
        assert main(["calibrate", "--run", str(run), "--target-quality", "0.95", "--out",
                     str(tmp_path / "strict.json"), "--json"]) == 0
        strict = json.loads(capsys.readouterr().out)
        assert strict["escalate_all"] is True and strict["certificate"]["delta"] == 0.05

        # 4. serve with the calibration: the cascade's first attempt uses the calibrated threshold
        served = settings_for(frontier_url, calibration_path=cal_path)
        with serve_app(create_app(served)) as base:
            client = OpenAI(base_url=base, api_key="unused")
            raw = client.chat.completions.with_raw_response.create(
                model="localroute/cascade", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": "Is 'great phone' positive or negative?"}],
            )
            info = raw.http_response.json()["localroute"]
        assert info["attempts"][0]["tier"] == "cheap"
        assert info["attempts"][0]["threshold"] == pytest.approx(threshold)

        # 5. --frontier live: the configured frontier answers each query and is scored like the cheap tier
        live = asyncio.run(run_eval(
            settings_for(frontier_url, frontier_base_url=frontier_url, frontier_model="scripted",
                         frontier_input_usd_per_mtok=1.0, frontier_output_usd_per_mtok=2.0),
            EvalConfig(dataset=dataset, out_dir=tmp_path / "live", limit=3, max_tokens=4, frontier="live",
                       progress=False)))
        assert live.computed == 3
        for r in read_rows(tmp_path / "live"):
            gold = next(json.loads(x) for x in dataset.read_text().splitlines() if json.loads(x)["id"] == r["id"])
            assert r["frontier"]["source"] == "live" and r["frontier"]["output"] == "positive"
            assert r["frontier"]["correct"] == (gold["answer"] == "positive")
            assert r["frontier_cost_usd"] == pytest.approx((5 * 1.0 + 1 * 2.0) / 1e6)  # usage x configured price

        # 5b. --verifier: the tier judges each answer; its P(Yes) is compared beside the aggregators
        verified = tmp_path / "verified"
        asyncio.run(run_eval(settings, EvalConfig(dataset=dataset, out_dir=verified, limit=4, max_tokens=4,
                                                  verifier="cheap", progress=False)))
        rows_v = read_rows(verified)
        assert len(rows_v) == 4 and all(0.0 <= r["verifier_p_yes"] <= 1.0 for r in rows_v)
        report_v = build_report(verified)
        assert set(report_v["aggregators"]) == set(report["aggregators"]) | {"verifier"}
        assert set(report_v["aggregators"]["verifier"]) >= {"auroc", "ece", "apgr", "cpt95"}
        with pytest.raises(ConfigError, match="different run"):  # the verifier is part of the run's identity
            asyncio.run(run_eval(settings, EvalConfig(dataset=dataset, out_dir=verified, limit=4, max_tokens=4,
                                                      progress=False)))

        # 6. a file calibrated for another model: loud warning, default threshold
        other = cal.model_copy(deep=True)
        other.tiers["cheap"].model_sha256 = "0" * 64
        write_calibration(other, cal_path)
        with caplog.at_level(logging.WARNING):
            tiers = build_tiers(settings_for(frontier_url, calibration_path=cal_path, default_threshold=-1.5))
        try:
            assert tiers[0].threshold == -1.5
            assert "CALIBRATION IGNORED for tier cheap" in caplog.text and "model file hash" in caplog.text
        finally:
            async def close() -> None:
                for t in tiers:
                    await t.backend.aclose()

            asyncio.run(close())
