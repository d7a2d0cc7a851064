"""Confidence aggregators against hand-computed values, and the one computation `serve` and
`calibrate` share."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from localroute.evaluation.runs import TOP_LOGPROBS, RunTable, append_rows, tokens_to_json, write_meta
from localroute.routing import confidence as c
from localroute.routing.base import Tier
from localroute.routing.cascade import CascadeRouter
from localroute.types import Generation, GenerationRequest, SamplingParams, TokenLogprob, TopLogprob
from tests.fakes import ScriptedBackend


def tok(lp: float, *alts: float) -> TokenLogprob:
    return TokenLogprob(0, "t", lp, None, tuple(TopLogprob("a", a) for a in alts))


TOKS = [tok(-0.1, -0.1, -2.0), tok(-1.0, -1.0, -1.5), tok(-0.5, -0.5, -0.6)]


def test_chow_sum_and_average() -> None:
    assert c.sum_logprob(TOKS) == pytest.approx(-1.6)
    assert c.mean_logprob(TOKS) == pytest.approx(-1.6 / 3)


def test_min_and_quantile() -> None:
    assert c.min_logprob(TOKS) == pytest.approx(-1.0)
    assert c.quantile_logprob(TOKS, 0.0) == pytest.approx(-1.0)
    assert c.quantile_logprob(TOKS, 0.5) == pytest.approx(-0.5)
    assert c.quantile_logprob(TOKS, 0.25) == pytest.approx(-0.75)


def test_margin_uses_top_two() -> None:
    assert c.mean_margin(TOKS) == pytest.approx((1.9 + 0.5 + 0.1) / 3)


def test_margin_without_alternatives_uses_rest_of_mass() -> None:
    p = math.exp(-0.1)
    assert c.mean_margin([tok(-0.1)]) == pytest.approx(math.log(p) - math.log(1 - p))


def test_entropy_of_uniform_top2_is_log2() -> None:
    assert c.neg_mean_entropy([tok(-1.0, -1.0, -1.0)]) == pytest.approx(-math.log(2))
    assert c.neg_mean_entropy([tok(0.0, 0.0, -50.0)]) == pytest.approx(0.0, abs=1e-9)


def test_empty_answer_has_no_confidence() -> None:
    for name in c.AGGREGATORS:
        assert c.confidence(name, []) == float("-inf")


def test_unknown_aggregator_names_the_choices() -> None:
    with pytest.raises(KeyError, match="mean_logprob"):
        c.get_aggregator("nope")


def test_all_confidences_covers_every_aggregator() -> None:
    assert set(c.all_confidences(TOKS)) == set(c.AGGREGATORS)


def test_entropy_reads_only_its_top_five() -> None:
    five = tok(-1.0, -1.0, -1.0, -1.0, -1.0, -1.0)
    more = tok(-1.0, *[-1.0] * 5, -1.2, -1.3, -2.0)  # 20 alternatives asked for: the same signal
    assert c.neg_mean_entropy([more]) == c.neg_mean_entropy([five]) == pytest.approx(-math.log(5))


def test_answer_confidence_without_evidence() -> None:
    for name in c.AGGREGATORS:
        assert c.answer_confidence(name, [], 0.1) == float("-inf")  # empty answer
        assert c.answer_confidence(name, [], 0.1, "text without logprobs") is None
        assert c.answer_confidence(name, TOKS, 0.1, "x") == c.confidence(name, TOKS, 0.1)


def _engine_answer(top_logprobs: int, n_tokens: int = 6, seed: int = 3) -> Generation:
    """A greedy answer as an engine returns it: each token heads its (sorted) alternatives, of which
    it shows as many as the request asked for."""
    rng = np.random.default_rng(seed)
    toks = []
    for i in range(n_tokens):
        lps = np.sort(np.log(rng.dirichlet(np.ones(40))))[::-1][:20]
        alts = tuple(TopLogprob(f"a{j}", float(lp)) for j, lp in enumerate(lps))
        toks.append(TokenLogprob(i, f"t{i}", alts[0].logprob, None, alts[:top_logprobs]))
    return Generation("".join(t.token for t in toks), toks, "stop", 3, n_tokens)


class _Engine(ScriptedBackend):
    def _generation(self, request: GenerationRequest) -> Generation:
        return _engine_answer(request.params.top_logprobs)


@pytest.mark.parametrize("client_top_logprobs", [0, 2, 5, 20])
@pytest.mark.parametrize("aggregator", sorted(c.AGGREGATORS))
def test_calibrate_sees_the_confidence_the_cascade_computes(tmp_path: Path, aggregator: str,
                                                           client_top_logprobs: int) -> None:
    """The same answer, recorded by `localroute eval` (TOP_LOGPROBS alternatives) and served to a
    client asking for `client_top_logprobs`: the confidence calibrate fits a threshold on is the one
    the cascade compares with that threshold, whatever the client asked for."""
    recorded = _engine_answer(TOP_LOGPROBS)
    run = tmp_path / "run"
    run.mkdir()
    write_meta(run, {"tier": "cheap", "frontier": {"mode": "oracle"}, "confidence_quantile_alpha": 0.3})
    with append_rows(run) as append:
        append({"id": "q", "output": recorded.text, "tokens": tokens_to_json(recorded.tokens),
                "cheap": {"score": 1.0, "correct": True}, "frontier": {"score": 1.0, "correct": True}})
    calibrate_sees = RunTable(run).conf[aggregator][0]

    router = CascadeRouter([Tier("cheap", _Engine("cheap"), threshold=0.0), Tier("frontier", ScriptedBackend())],
                           aggregator=aggregator, alpha=0.3)
    request = GenerationRequest(prompt="q", params=SamplingParams(max_tokens=8, top_logprobs=client_top_logprobs))
    routed = asyncio.run(router.route(request))
    served = routed.decision.attempts[0]
    assert served.tier == "cheap" and served.confidence is not None and math.isfinite(served.confidence)
    assert served.confidence == calibrate_sees


# ---------------------------------------------------------------- label and field confidence


def toks(*pieces: tuple[str, float]) -> list[TokenLogprob]:
    return [TokenLogprob(i, text, lp) for i, (text, lp) in enumerate(pieces)]


JSON_ANSWER = toks(('{"', -0.01), ("label", -3.0), ('":', -0.02), (' "', -0.05), ("pos", -0.4), ("itive", -0.1),
                   ('",', -0.2), (' "', -0.01), ("score", -2.0), ('":', -0.01), (" 3", -1.2), ("}", -0.5))


def test_field_confidence_reads_value_tokens_only() -> None:
    """Keys, quotes, colons and braces carry no decision: `label` is the mean of `pos` and
    `itive`, `score` that of ` 3` (keys at -3 and -2 do not count)."""
    per_field = c.field_confidences(JSON_ANSWER)
    assert per_field == pytest.approx({"label": (-0.4 - 0.1) / 2, "score": -1.2})
    assert c.field_confidence(JSON_ANSWER) == pytest.approx(-1.2)  # the least confident field
    assert c.field_confidence(JSON_ANSWER, fields=["label"]) == pytest.approx(-0.25)  # the deciding field
    assert c.field_confidence(JSON_ANSWER, fields=["missing"]) == float("-inf")


def test_field_confidence_leaves_out_grammar_forced_tokens() -> None:
    """`itive` (index 5) was the only continuation the grammar allowed: it says nothing."""
    assert c.field_confidences(JSON_ANSWER, forced=[5])["label"] == pytest.approx(-0.4)
    assert c.field_confidences(JSON_ANSWER, forced=[4, 5])["label"] == 0.0  # all forced: certain
    conf = c.answer_confidence("field_confidence", JSON_ANSWER, 0.1, "x", {"forced_tokens": [10]}, ["score"])
    assert conf == 0.0


def test_field_confidence_on_key_value_lines_and_nested_json() -> None:
    lines = toks(("person", -2.0), (":", -0.1), (" John", -0.3), ("\n", -0.1), ("location", -1.0), (": ", -0.1),
                 ("Paris", -0.9))
    assert c.field_confidences(lines) == pytest.approx({"person": -0.3, "location": -0.9})
    nested = toks(('{"a": {"b": ', -1.0), ("true", -0.7), ("}, ", -0.1), ('"c": [', -0.2), ("1", -0.3), ("]}", -0.1))
    assert c.field_confidences(nested) == pytest.approx({"a.b": -0.7, "c": -0.3})


def test_field_confidence_of_unstructured_text_is_mean_of_unforced_tokens() -> None:
    plain = toks(("The", -1.0), (" answer", -0.5), (" is", -0.3))
    assert c.field_confidences(plain) is None
    assert c.field_confidence(plain) == pytest.approx(-0.6)
    assert c.field_confidence(plain, forced=[0]) == pytest.approx(-0.4)


def test_label_confidence_is_the_engine_score() -> None:
    plain = toks(("pos", -1.0), ("itive", -0.5))
    assert c.answer_confidence("label_confidence", plain, 0.1, "", {"label": {"chosen": "positive",
                                                                         "logprob": -0.2}}) == -0.2
    # labels were known, the answer named none (or scoring failed): no evidence, it escalates
    assert c.answer_confidence("label_confidence", plain, 0.1, "", {"label": {"chosen": None,
                                                                         "logprob": None}}) == float("-inf")
    # no labels in the request: mean_logprob
    assert c.answer_confidence("label_confidence", plain, 0.1, "") == pytest.approx(-0.75)
    c.check_signal("label_confidence")
    with pytest.raises(KeyError):
        c.check_signal("nope")


# ---------------------------------------------------------------- serve == eval, real model and server


@pytest.mark.slow
def test_served_confidence_equals_the_eval_runs_rescoring(tmp_path: Path) -> None:
    """One answer, two ways: served by `localroute serve` (real SmolLM2, real HTTP server, the
    openai client asking top_logprobs 20 and naming the labels in metadata) and recorded by
    `localroute eval` (5 alternatives kept) then rescored by RunTable as `calibrate` does. The
    cascade's confidence (neg_mean_entropy: the aggregator that reads alternatives) and every
    aggregator over the served tokens equal the eval run's, exactly. (The labels are not scored
    when serving on neg_mean_entropy; the eval run scores them, as its rows record every signal.)"""
    import json as _json

    from fastapi import FastAPI
    from openai import OpenAI

    from localroute.evaluation.datasets import EvalItem, write_items
    from localroute.evaluation.runner import EvalConfig, run_eval
    from localroute.server.app import create_app
    from tests.conftest import local_settings, serve_app

    frontier = FastAPI()

    @frontier.post("/v1/chat/completions")
    async def _chat(body: dict[str, object]) -> dict[str, object]:  # only reached if the answer escalates
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "f",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                  "total_tokens": 2}}

    labels = ["negative", "neutral", "positive"]
    messages = [{"role": "system", "content": "Reply with the answer alone, exactly as one of the options."},
                {"role": "user", "content": "Sentiment of this tweet? Options: negative, neutral, positive.\n\n"
                                            "Tweet: the update broke my phone again"}]
    with serve_app(frontier) as frontier_url:
        settings = local_settings(tiers=[
            {"name": "cheap", "model": "smollm2-135m", "threshold": -100.0},
            {"name": "frontier", "kind": "openai", "model": "f", "base_url": frontier_url}],
            confidence_aggregator="neg_mean_entropy")
        with serve_app(create_app(settings)) as url:
            body = OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
                model="localroute/cascade", messages=messages, max_tokens=8, temperature=0, stop=["\n"],
                logprobs=True, top_logprobs=20, extra_body={"metadata": {"labels": _json.dumps(labels)}})
        dataset = tmp_path / "one.jsonl"
        write_items([EvalItem(id="q", task="choice", messages=messages, choices=labels, answer="negative",
                              max_tokens=8, stop=["\n"])], dataset)
        asyncio.run(run_eval(settings, EvalConfig(dataset=dataset, out_dir=tmp_path / "run", progress=False)))
    info = body.model_extra["localroute"]
    served = info["attempts"][0]
    assert served["tier"] == "cheap" and served["accepted"]
    table = RunTable(tmp_path / "run")
    assert served["confidence"] == table.conf["neg_mean_entropy"][0]
    assert "label" not in info["evidence"]  # labels are scored only when the cascade decides on them
    content = body.choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 20 for t in content)  # the client saw what it asked for
    served_tokens = [TokenLogprob(0, t.token, t.logprob, None,
                                  tuple(TopLogprob(a.token, a.logprob) for a in t.top_logprobs)) for t in content]
    for name in c.AGGREGATORS:
        assert c.confidence(name, served_tokens, table.alpha) == table.conf[name][0], name


def test_signal_used_names_what_label_confidence_read() -> None:
    from localroute.routing.confidence import answer_confidence, signal_used

    toks = [tok(-1.0), tok(-3.0)]
    scored = {"label": {"chosen": "a", "logprob": -0.25}}
    assert signal_used("label_confidence", toks, "ab", scored) == ("label_confidence", None)
    assert answer_confidence("label_confidence", toks, 0.1, "ab", scored) == -0.25
    used, why = signal_used("label_confidence", toks, "ab", {})
    assert used == "mean_logprob" and why and answer_confidence("label_confidence", toks, 0.1, "ab", {}) == -2.0
    missing = {"label": {"chosen": None, "logprob": None}}
    assert signal_used("label_confidence", toks, "ab", missing)[0] == "none"
    assert answer_confidence("label_confidence", toks, 0.1, "ab", missing) == float("-inf")
    assert signal_used("mean_logprob", toks, "ab", {}) == ("mean_logprob", None)
    assert signal_used("label_confidence", [], "ab", scored)[0] == "none"  # text without logprobs
