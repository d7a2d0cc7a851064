"""The verifier signal with the real SmolLM2 as judge (AutoMix-style P(Yes))."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.routing.base import Tier
from localroute.routing.verifier import VerifiedCascadeRouter, Verifier, yes_probability
from localroute.types import Generation, GenerationRequest, SamplingParams, TokenLogprob, TopLogprob


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend("smollm2", LlamaEngine(smollm2_path, n_ctx_seq=512, n_parallel=2, n_threads=2))
    yield backend
    asyncio.run(backend.aclose())


REQ = GenerationRequest(messages=({"role": "user", "content": "What is the capital of France?"},),
                        params=SamplingParams(max_tokens=8, temperature=0.0))


def test_yes_probability_reads_top_alternatives() -> None:
    tok = TokenLogprob(1, "Yes", -0.2, top_logprobs=(TopLogprob("Yes", -0.2), TopLogprob(" no", -1.8),
                                                      TopLogprob("Maybe", -3.0)))
    p = yes_probability(Generation("Yes", [tok], "length", 1, 1))
    assert p == pytest.approx(0.8320, abs=1e-3)  # e^-0.2 / (e^-0.2 + e^-1.8)
    assert yes_probability(Generation("", [], "stop", 1, 0)) == 0.5


def test_real_verifier_scores_in_unit_interval(smol: LlamaCppBackend) -> None:
    v = Verifier(smol)
    p_right = asyncio.run(v.score(REQ, "The capital of France is Paris."))
    assert 0.0 <= p_right <= 1.0
    # the real model put mass on Yes/No tokens (0.5 exactly would mean neither was in the top 20)
    assert p_right != 0.5


@pytest.mark.parametrize("threshold,escalates", [(1.01, True), (0.0, False)])
def test_verifier_decides_the_cascade(smol: LlamaCppBackend, threshold: float, escalates: bool) -> None:
    tiers = [Tier("cheap", smol, threshold=-1e9), Tier("strong", smol, None)]
    router = VerifiedCascadeRouter(tiers, Verifier(smol), mode="alone", verifier_threshold=threshold)
    routed = asyncio.run(router.route(REQ))
    assert routed.decision.escalated is escalates
    assert routed.decision.signal == "verifier"
    p = routed.decision.evidence["verifier"]["cheap"]
    assert routed.decision.attempts[0].confidence == pytest.approx(p)


def test_verifier_combined_with_logprob_needs_both(smol: LlamaCppBackend) -> None:
    # the verifier would accept anything (threshold 0) but the logprob threshold is unreachable
    tiers = [Tier("cheap", smol, threshold=1.0), Tier("strong", smol, None)]
    router = VerifiedCascadeRouter(tiers, Verifier(smol), mode="and", verifier_threshold=0.0)
    routed = asyncio.run(router.route(REQ))
    assert routed.decision.escalated
    assert routed.decision.signal == "mean_logprob+verifier"


def test_the_verified_cascade_honours_early_escalation_and_confidence_fields() -> None:
    """serve's verified policy takes early_escalation and the tiers' confidence_fields as the cascade
    does (before, early escalation was on in mode `and` whatever the setting, and fields ignored)."""
    from localroute.routing.cascade import CascadeRouter
    from localroute.routing.prerouter import build_policies
    from localroute.settings import Settings
    from localroute.types import GenerationRequest
    from tests.fakes import ScriptedBackend

    cheap, strong = ScriptedBackend("cheap", "A", -0.1), ScriptedBackend("strong", "B", -0.1, local=False)
    tiers = [Tier("cheap", cheap, -1.0), Tier("strong", strong, None)]
    cascade = CascadeRouter(tiers, "mean_logprob", fields={"cheap": ("label",)}, early_escalation=False)
    settings = Settings(verifier_tier="cheap", verifier_mode="and", early_escalation=False,
                        confidence_aggregator="mean_logprob")
    verified = build_policies(settings, tiers, cascade)["localroute/verified"]
    assert isinstance(verified, VerifiedCascadeRouter) and verified.fields == {"cheap": ("label",)}
    assert verified._tier_request(GenerationRequest(prompt="x"), tiers[0]).escalate_below is None
    on = VerifiedCascadeRouter(tiers, Verifier(cheap), mode="and")  # the default: on
    assert on._tier_request(GenerationRequest(prompt="x"), tiers[0]).escalate_below is not None
