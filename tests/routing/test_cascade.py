"""Cascade logic with scripted backends (the real-model cascade is in test_server_escalation)."""

from __future__ import annotations

import asyncio

import pytest

from localroute.errors import InvalidRequestError, UpstreamError
from localroute.routing import CascadeRouter, Tier
from localroute.routing.base import Routed
from localroute.types import EscalationBound, Generation, GenerationRequest, SamplingParams
from tests.fakes import ScriptedBackend

REQ = GenerationRequest(messages=({"role": "user", "content": "hi"},))


def ladder(conf_a: float, threshold: float = -1.0, frontier_error: Exception | None = None) -> tuple[CascadeRouter, ScriptedBackend, ScriptedBackend]:
    a = ScriptedBackend("a", "local answer", [conf_a, conf_a])
    f = ScriptedBackend("f", "frontier answer", [-0.01], local=False, error=frontier_error)
    return CascadeRouter([Tier("a", a, threshold), Tier("f", f, None)]), a, f


def test_confident_answer_stays_local() -> None:
    router, a, f = ladder(-0.2)
    routed = asyncio.run(router.route(REQ))
    assert routed.generation.text == "local answer" and routed.decision.answered_by == "a"
    assert not routed.decision.escalated and f.calls == 0
    assert routed.decision.confidence == pytest.approx(-0.2)


def test_unconfident_answer_escalates_and_records_both_tiers() -> None:
    router, a, f = ladder(-2.0)
    routed = asyncio.run(router.route(REQ))
    d = routed.decision
    assert routed.generation.text == "frontier answer" and d.answered_by == "f" and d.escalated
    assert [(x.tier, x.accepted) for x in d.attempts] == [("a", False), ("f", True)]
    assert d.attempts[0].confidence == pytest.approx(-2.0)


def test_threshold_is_inclusive() -> None:
    router, _, _ = ladder(-1.0, threshold=-1.0)
    assert asyncio.run(router.route(REQ)).decision.answered_by == "a"


def test_frontier_failure_degrades_to_local_answer() -> None:
    router, _, _ = ladder(-2.0, frontier_error=UpstreamError("down"))
    routed = asyncio.run(router.route(REQ))
    assert routed.generation.text == "local answer"
    assert routed.decision.degraded == "f_upstream_error"
    assert routed.decision.attempts[-1].error == "down"


def test_client_errors_are_not_swallowed() -> None:
    router, _, _ = ladder(-2.0, frontier_error=InvalidRequestError("bad"))
    with pytest.raises(InvalidRequestError):
        asyncio.run(router.route(REQ))


def test_three_tier_ladder_stops_at_first_confident_tier() -> None:
    a = ScriptedBackend("a", "small", [-3.0])
    b = ScriptedBackend("b", "medium", [-0.3])
    f = ScriptedBackend("f", "big", [-0.1], local=False)
    router = CascadeRouter([Tier("a", a, -1.0), Tier("b", b, -0.5), Tier("f", f, None)])
    routed = asyncio.run(router.route(REQ))
    assert routed.decision.answered_by == "b" and f.calls == 0 and len(routed.decision.attempts) == 2


def test_stream_never_shows_a_replaced_answer() -> None:
    router, _, _ = ladder(-2.0)

    async def collect() -> tuple[str, str]:
        text, final = "", None
        async for item in router.route_stream(REQ):
            text += item.delta.text
            if item.routed:
                final = item.routed.decision.answered_by
        assert final is not None
        return text, final

    text, tier = asyncio.run(collect())
    assert text == "frontier answer" and tier == "f"


def test_stream_of_local_answer_replays_it_exactly() -> None:
    router, _, _ = ladder(-0.1)

    async def collect() -> str:
        return "".join([item.delta.text async for item in router.route_stream(REQ)])

    assert asyncio.run(collect()) == "local answer"


def test_aggregator_is_selectable() -> None:
    a = ScriptedBackend("a", "xy", [-0.1, -3.0])
    f = ScriptedBackend("f", "F", [-0.1], local=False)
    mean = CascadeRouter([Tier("a", a, -1.0), Tier("f", f)], aggregator="mean_logprob")
    minimum = CascadeRouter([Tier("a", a, -1.0), Tier("f", f)], aggregator="min_logprob")
    assert asyncio.run(mean.route(REQ)).decision.answered_by == "f"  # mean -1.55
    assert asyncio.run(minimum.route(REQ)).decision.attempts[0].confidence == pytest.approx(-3.0)


@pytest.mark.parametrize("policy", ["degrade", "fail"])
def test_verified_policy_honours_the_escalation_failure_policy(policy: str) -> None:
    from localroute.routing.verifier import VerifiedCascadeRouter, Verifier

    cheap = ScriptedBackend("a", "local answer", [-0.1])
    judge = ScriptedBackend("j", "No", [-0.01])  # the verifier rejects the cheap answer: escalate
    down = ScriptedBackend("f", "F", [-0.1], local=False, error=UpstreamError("down"))
    router = VerifiedCascadeRouter([Tier("a", cheap, -5.0), Tier("f", down)], Verifier(judge), on_failure=policy)
    if policy == "fail":
        with pytest.raises(UpstreamError):
            asyncio.run(router.route(REQ))
    else:
        routed = asyncio.run(router.route(REQ))
        assert routed.generation.text == "local answer" and routed.decision.degraded == "f_upstream_error"


LOOP = "la Femme, " * 12  # issue 13: SmolLM2's answer to "What is the capital of France?"


@pytest.mark.parametrize("stream", [False, True])
def test_a_confident_looping_answer_escalates_with_its_evidence(stream: bool) -> None:
    """Accepted today at -0.375 against -1.0: a loop is rejected whatever its logprobs."""
    a = ScriptedBackend("a", LOOP, [-0.375] * 36)
    f = ScriptedBackend("f", "Paris.", [-0.01], local=False)
    router = CascadeRouter([Tier("a", a, -1.0), Tier("f", f, None)])
    if stream:
        async def last() -> Routed:
            return [d async for d in router.route_stream(REQ)][-1].routed  # type: ignore[return-value]
        routed = asyncio.run(last())
    else:
        routed = asyncio.run(router.route(REQ))
    d = routed.decision
    assert routed.generation.text == "Paris." and d.answered_by == "f" and d.escalated
    assert d.attempts[0].confidence == pytest.approx(-0.375) and d.attempts[0].accepted is False
    assert d.evidence["repetition"]["a"] == {"ngram": "la Femme,", "repeats": 12, "coverage": 1.0}
    assert "repetition" in d.as_dict()["evidence"]


def test_repetition_check_can_be_turned_off_and_normal_answers_pass() -> None:
    from localroute.routing.repetition import RepetitionCheck

    a = ScriptedBackend("a", LOOP, [-0.375] * 36)
    f = ScriptedBackend("f", "Paris.", [-0.01], local=False)
    off = CascadeRouter([Tier("a", a, -1.0), Tier("f", f, None)], repetition=RepetitionCheck(min_repeats=0))
    assert asyncio.run(off.route(REQ)).decision.answered_by == "a"
    listing = ScriptedBackend("a", "1. red\n2. green\n3. blue\n4. yellow\n5. purple", [-0.3] * 15)
    routed = asyncio.run(CascadeRouter([Tier("a", listing, -1.0), Tier("f", f, None)]).route(REQ))
    assert routed.decision.answered_by == "a" and "repetition" not in routed.decision.evidence


def test_verified_policy_rejects_a_loop_whatever_the_verifier_says() -> None:
    from localroute.routing.verifier import VerifiedCascadeRouter, Verifier

    cheap = ScriptedBackend("a", LOOP, [-0.1] * 36)
    judge = ScriptedBackend("j", "Yes", [-0.01])  # the verifier would vouch for it
    f = ScriptedBackend("f", "Paris.", [-0.01], local=False)
    routed = asyncio.run(VerifiedCascadeRouter([Tier("a", cheap, -5.0), Tier("f", f)], Verifier(judge)).route(REQ))
    assert routed.decision.answered_by == "f" and "a" in routed.decision.evidence["repetition"]
    assert judge.calls == 0  # no verdict asked for an answer already rejected


# ---------------------------------------------------------------- early escalation, signals


class _Recording(ScriptedBackend):
    """Scripted tier that keeps the requests it got and adds `extra` to its answers."""

    def __init__(self, *args: object, extra: dict[str, object] | None = None, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.requests: list[GenerationRequest] = []
        self.extra = extra or {}

    def _generation(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        gen = super()._generation(request)
        gen.extra.update(self.extra)
        return gen


def test_non_final_local_tier_gets_the_escalation_bound_and_the_last_tier_none() -> None:
    a = _Recording("a", "local answer", [-0.2, -0.2])
    f = _Recording("f", "frontier", [-0.1], local=False)
    router = CascadeRouter([Tier("a", a, -1.0), Tier("f", f, None)], aggregator="min_logprob", alpha=0.2)
    asyncio.run(router.route(REQ))
    assert a.requests[0].escalate_below == EscalationBound("min_logprob", -1.0, 0.2)
    off = CascadeRouter([Tier("a", a, -1.0), Tier("f", f, None)], early_escalation=False)
    asyncio.run(off.route(REQ))
    assert a.requests[-1].escalate_below is None


def test_an_answer_stopped_early_escalates_with_its_evidence() -> None:
    a = _Recording("a", "local", [-0.01], extra={"early_exit": {"after_tokens": 1, "best": -3.0}})
    f = ScriptedBackend("f", "frontier answer", [-0.01], local=False)
    routed = asyncio.run(CascadeRouter([Tier("a", a, -1.0), Tier("f", f, None)]).route(REQ))
    assert routed.decision.answered_by == "f"
    assert routed.decision.evidence["early_exit"] == {"a": {"after_tokens": 1, "best": -3.0}}


def test_field_confidence_decides_on_the_named_fields_and_shows_every_field() -> None:
    text = '{"label": "spam", "note": "whatever text"}'
    a = _Recording("a", text, [-0.01, -0.01, -0.01, -5.0])  # the last piece (the note's tail) is unsure
    f = ScriptedBackend("f", "frontier answer", [-0.01], local=False)
    fmt = {"type": "json_object"}
    req = GenerationRequest(messages=REQ.messages, params=SamplingParams(response_format=fmt))
    tiers = [Tier("a", a, -1.0), Tier("f", f, None)]
    by_label = asyncio.run(CascadeRouter(tiers, "field_confidence", fields={"a": ("label",)}).route(req))
    assert by_label.decision.answered_by == "a"
    fields = by_label.decision.evidence["fields"]["a"]
    assert set(fields) == {"label", "note"} and fields["note"] < -1.0 <= fields["label"]
    by_all = asyncio.run(CascadeRouter(tiers, "field_confidence").route(req))
    assert by_all.decision.answered_by == "f"


def test_label_evidence_and_label_confidence() -> None:
    a = _Recording("a", "positive", [-2.0], extra={"label": {"chosen": "positive", "logprob": -0.1, "n_labels": 3}})
    f = ScriptedBackend("f", "frontier answer", [-0.01], local=False)
    routed = asyncio.run(CascadeRouter([Tier("a", a, -0.5), Tier("f", f, None)], "label_confidence").route(REQ))
    assert routed.decision.answered_by == "a" and routed.decision.confidence == -0.1
    assert routed.decision.evidence["label"]["a"] == {"chosen": "positive", "logprob": -0.1, "n_labels": 3}
    with pytest.raises(KeyError):
        CascadeRouter([Tier("a", a, -0.5)], "no_such_signal")


@pytest.mark.parametrize(("extra", "signal", "why"), [
    ({"label": {"chosen": "positive", "logprob": -0.1, "n_labels": 3}}, "label_confidence", None),
    ({}, "mean_logprob", "no label scores"),
    ({"label": {"chosen": None, "logprob": None, "n_labels": 3}}, "none", "names none of the allowed labels"),
    ({"label": {"chosen": "positive", "logprob": None, "error": "no room to score the labels"}}, "none",
     "no room to score the labels"),
])
def test_the_decision_says_which_signal_label_confidence_read(extra: dict[str, object], signal: str,
                                                              why: str | None) -> None:
    """label_confidence without a label score falls back (mean_logprob, or -inf); the evidence
    names the signal each tier's confidence actually came from, and why it is not the label's."""
    a = _Recording("a", "positive", [-2.0], extra=extra)
    f = ScriptedBackend("f", "frontier answer", [-0.01], local=False)
    routed = asyncio.run(CascadeRouter([Tier("a", a, -0.5), Tier("f", f, None)], "label_confidence").route(REQ))
    used = routed.decision.evidence["signal_used"]
    assert routed.decision.signal == "label_confidence"
    assert used["a"]["signal"] == signal and (why is None) == ("why" not in used["a"])
    assert why is None or why in used["a"]["why"]
    assert routed.decision.answered_by == ("a" if signal == "label_confidence" else "f")
    assert set(used) == {t.tier for t in routed.decision.attempts}
    assert signal == "label_confidence" or used["f"]["signal"] == "mean_logprob"  # the frontier scores no labels
    plain = asyncio.run(CascadeRouter([Tier("a", a, -0.5), Tier("f", f, None)]).route(REQ))
    assert "signal_used" not in plain.decision.evidence  # mean_logprob reads what it says


def test_a_tool_call_cut_by_max_tokens_escalates_whatever_its_confidence() -> None:
    router, a, f = ladder(-0.01)
    tools = ({"name": "get_weather", "parameters": {"type": "object"}},)
    cut = GenerationRequest(prompt="weather?", params=SamplingParams(max_tokens=1), tools=tools)
    routed = asyncio.run(router.route(cut))
    assert routed.decision.answered_by == "f" and routed.decision.escalated
    assert routed.decision.evidence["truncated_tool_call"] == {"a": 1}
    whole = GenerationRequest(prompt="weather?", params=SamplingParams(max_tokens=64), tools=tools)
    routed = asyncio.run(router.route(whole))  # the same call, finished: confident, kept
    assert routed.decision.answered_by == "a" and "truncated_tool_call" not in routed.decision.evidence


def test_the_early_escalation_bound_is_the_request_category_threshold() -> None:
    a, f = ScriptedBackend("a", "A", [-0.1]), ScriptedBackend("f", "F", [-0.1], local=False)
    tier = Tier("a", a, -1.0, category_thresholds={"classify": -3.0})
    router = CascadeRouter([tier, Tier("f", f, None)])
    for category, threshold in (("classify", -3.0), ("default", -1.0)):
        asked = router._tier_request(GenerationRequest(prompt="x", category=category), tier)
        assert asked.escalate_below is not None and asked.escalate_below.threshold == threshold


class _Reloading(ScriptedBackend):
    """A local tier during whose decode a new calibration is applied (another thread's swap)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.tier: Tier | None = None
        self.asked: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> Generation:
        self.asked.append(request)
        assert self.tier is not None
        self.tier.set_thresholds(-0.01, {"classify": -0.01})  # stricter: would reject -0.1
        return await super().generate(request)


def test_an_attempt_reads_its_threshold_once_even_if_a_reload_lands_mid_decode() -> None:
    a, f = _Reloading("a", "A", [-0.1]), ScriptedBackend("f", "F", [-0.1], local=False)
    tier = Tier("a", a, -1.0, category_thresholds={"classify": -0.5})
    a.tier = tier
    routed = asyncio.run(CascadeRouter([tier, Tier("f", f, None)]).route(GenerationRequest(prompt="x",
                                                                                           category="classify")))
    bound = a.asked[0].escalate_below
    assert bound is not None and bound.threshold == -0.5
    attempt = routed.decision.attempts[0]
    assert attempt.threshold == -0.5 and attempt.accepted and routed.decision.answered_by == "a"
    assert tier.threshold_for("classify") == -0.01  # the next request sees the new version, whole


def test_thresholds_are_one_immutable_version() -> None:
    tier = Tier("a", ScriptedBackend("a"), -1.0, category_thresholds={"x": -0.5})
    before = tier.thresholds
    with pytest.raises(TypeError):
        tier.category_thresholds["x"] = 0.0  # type: ignore[index]
    tier.set_thresholds(-2.0, {"y": -0.1})
    assert (before.pooled, dict(before.categories)) == (-1.0, {"x": -0.5})  # a reader holding it is unaffected
    assert tier.threshold_for("y") == -0.1 and tier.threshold_for("x") == -2.0
