"""Quality signals beyond token logprobs: schema validity and a verifier model.

- `schema_violation` (response_format.py): for json_object / json_schema, the answer must parse as JSON
  (an object for json_object) and validate against the schema (jsonschema, Draft 2020-12). The
  cascade rejects a violating answer whatever its confidence (`CascadeRouter._judge`).
- `Verifier`: AutoMix-style self-verification (Madaan et al., 2023): a local tier is asked whether
  the proposed answer to the question is correct, and the signal is P(Yes) / (P(Yes) + P(No)) read
  from the logprobs of its first answer token (top-20 alternatives), so one decode step suffices.
- `VerifiedCascadeRouter`: the cascade with the verifier as its signal, alone (`mode="alone"`: the
  verifier probability is the confidence) or combined with the logprob aggregator (`mode="and"`: an
  answer must pass both the tier's logprob threshold and the verifier threshold).
"""

from __future__ import annotations

from collections.abc import Sequence

from localroute.backends.base import Backend
from localroute.embeddings import request_text
from localroute.routing.base import Decision, Tier
from localroute.routing.cascade import CascadeRouter, vetoed
from localroute.routing.repetition import RepetitionCheck
from localroute.types import (
    EscalationBound,
    Generation,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

VERIFY_TEMPLATE = (
    "Question:\n{question}\n\nProposed answer:\n{answer}\n\n"
    "Is the proposed answer correct? Reply with Yes or No."
)


def yes_probability(gen: Generation) -> float:
    """P(Yes) / (P(Yes) + P(No)) over the first token's top alternatives; 0.5 when neither shows."""
    if not gen.tokens:
        return 0.5
    import math

    first = gen.tokens[0]
    candidates: list[TopLogprob | TokenLogprob] = [*first.top_logprobs, first]
    p_yes = p_no = 0.0
    seen = set()
    for alt in candidates:
        token = alt.token
        if token in seen:
            continue
        seen.add(token)
        word = token.strip().lower()
        if word in ("yes", "y"):
            p_yes += math.exp(alt.logprob)
        elif word in ("no", "n"):
            p_no += math.exp(alt.logprob)
    if p_yes + p_no <= 0:
        return 0.5
    return p_yes / (p_yes + p_no)


class Verifier:
    """Asks a (local) backend whether an answer is correct; one token of decoding."""

    def __init__(self, backend: Backend, top_logprobs: int = 20, template: str = VERIFY_TEMPLATE) -> None:
        self.backend = backend
        self.top_logprobs = top_logprobs
        self.template = template

    def request(self, request: GenerationRequest, answer: str) -> GenerationRequest:
        question = request_text(request.messages, request.prompt)
        content = self.template.format(question=question[-4000:], answer=answer[-4000:])
        return GenerationRequest(
            messages=({"role": "user", "content": content},),
            params=SamplingParams(max_tokens=1, temperature=0.0, top_logprobs=self.top_logprobs),
            request_id=f"{request.request_id}-verify" if request.request_id else "",
        )

    async def score(self, request: GenerationRequest, answer: str) -> float:
        gen = await self.backend.generate(self.request(request, answer))
        return yes_probability(gen)


class VerifiedCascadeRouter(CascadeRouter):
    """A cascade whose acceptance test includes a verifier's judgement of each cheap answer."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        verifier: Verifier,
        aggregator: str = "mean_logprob",
        alpha: float = 0.1,
        policy: str = "localroute/verified",
        mode: str = "alone",
        verifier_threshold: float = 0.5,
        on_failure: str = "degrade",
        on_budget: str = "degrade",
        repetition: RepetitionCheck | None = None,
        early_escalation: bool = True,
        fields: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """`early_escalation`, `fields`: as CascadeRouter's (early escalation applies in mode `and` only)."""
        if mode not in ("alone", "and"):
            raise ValueError("verifier mode must be 'alone' or 'and'")
        super().__init__(tiers, aggregator, alpha, policy, on_failure=on_failure, on_budget=on_budget,
                         repetition=repetition, early_escalation=early_escalation, fields=fields)
        self.verifier = verifier
        self.mode = mode
        self.verifier_threshold = verifier_threshold
        self.signal = "verifier" if mode == "alone" else f"{aggregator}+verifier"

    def _bound(self, tier: Tier, threshold: float | None) -> EscalationBound | None:
        """Early escalation only where the logprob threshold must pass too (mode `and`); alone,
        the verifier may accept an answer whatever its logprobs."""
        return super()._bound(tier, threshold) if self.mode == "and" else None

    async def _judge(
        self, tier: Tier, request: GenerationRequest, gen: Generation, decision: Decision, threshold: float | None
    ) -> tuple[float | None, bool]:
        conf, accepted = await super()._judge(tier, request, gen, decision, threshold)
        if "early_exit" in gen.extra:  # stopped early: the logprob threshold already failed
            return conf, False
        if vetoed(decision, tier.name):  # broken format or a loop: no verdict can save it
            return conf, False
        from localroute.errors import LocalrouteError

        try:
            p = await self.verifier.score(request, gen.text)
        except LocalrouteError as exc:  # no verdict: the answer is not vouched for, so it escalates
            decision.evidence.setdefault("verifier_errors", {})[tier.name] = exc.message
            return conf, False
        decision.evidence.setdefault("verifier", {})[tier.name] = p
        if self.mode == "alone":
            return p, p >= self.verifier_threshold
        return conf, accepted and p >= self.verifier_threshold
