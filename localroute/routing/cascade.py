"""Cascade: each tier answers in turn until one is confident enough; the last tier always answers.

Streaming never shows tokens of an answer that is later replaced: a non-final tier's answer is
generated in full (buffered) and its confidence computed before the first byte is sent. The cost
is time-to-first-token: a streamed request that stays local sees its first token only once the
local answer is complete (its whole decode time); an escalated one pays the local decode time plus
the next tier's own TTFT. Only the last tier streams token by token as it decodes.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace

from localroute.errors import EngineDeadError, InvalidRequestError, LocalrouteError
from localroute.routing.base import Decision, Routed, RoutedDelta, Tier, TierAttempt
from localroute.routing.confidence import TOP_K_NEEDED, answer_confidence, get_aggregator
from localroute.routing.repetition import RepetitionCheck
from localroute.types import Generation, GenerationRequest, StreamDelta

log = logging.getLogger(__name__)

_Fallback = tuple[Generation, str] | None

# decision.evidence keys of the checks that reject an answer whatever its confidence
VETO_EVIDENCE = ("schema_violations", "repetition")


def vetoed(decision: Decision, tier: str) -> bool:
    """Whether a veto check (VETO_EVIDENCE) rejected this tier's answer."""
    return any(tier in decision.evidence.get(key, {}) for key in VETO_EVIDENCE)


def replay(gen: Generation) -> Iterator[StreamDelta]:
    """A buffered answer as stream deltas, one per token, UTF-8 safe, text identical to gen.text."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    emitted = 0
    for tok in gen.tokens:
        raw = bytes(tok.bytes) if tok.bytes is not None else tok.token.encode()
        piece = decoder.decode(raw)
        piece = gen.text[emitted : emitted + len(piece)]
        emitted += len(piece)
        yield StreamDelta(text=piece, token=tok)
    if emitted < len(gen.text):
        yield StreamDelta(text=gen.text[emitted:])


class CascadeRouter:
    """Ordered ladder of tiers with per-tier thresholds on one confidence aggregator."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        aggregator: str = "mean_logprob",
        alpha: float = 0.1,
        policy: str = "localroute/cascade",
        on_failure: str = "degrade",
        on_budget: str = "degrade",
        repetition: RepetitionCheck | None = None,
    ) -> None:
        """`on_failure` ('degrade' | 'fail') and `on_budget` ('degrade' | 'reject') say what a
        failed last tier yields when an earlier answer exists: that answer, flagged degraded, or
        the last tier's own error (502/503, or 429 budget_exceeded). `repetition`: the loop
        check's thresholds (default RepetitionCheck())."""
        if not tiers:
            raise ValueError("a cascade needs at least one tier")
        self.tiers = list(tiers)
        self.signal = aggregator
        self._aggregate = get_aggregator(aggregator)
        self._alpha = alpha
        self._top_k = TOP_K_NEEDED.get(aggregator, 0)
        self.policy = policy
        self.on_failure = on_failure
        self.on_budget = on_budget
        self.repetition = repetition if repetition is not None else RepetitionCheck()

    def _confidence(self, gen: Generation) -> float | None:
        return answer_confidence(self.signal, gen.tokens, self._alpha, gen.text)

    def _tier_request(self, request: GenerationRequest) -> GenerationRequest:
        if request.params.top_logprobs >= self._top_k:
            return request
        return replace(request, params=replace(request.params, top_logprobs=self._top_k))

    def _attempt(self, tier: Tier, gen: Generation, conf: float | None, accepted: bool) -> TierAttempt:
        return TierAttempt(
            tier=tier.name,
            confidence=conf,
            threshold=tier.threshold,
            accepted=accepted,
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            latency_s=gen.latency_s,
            ttft_s=gen.ttft_s,
        )

    def _accepts(self, tier: Tier, conf: float | None) -> bool:
        return tier.threshold is None or (conf is not None and conf >= tier.threshold)

    async def _judge(
        self, tier: Tier, request: GenerationRequest, gen: Generation, decision: Decision
    ) -> tuple[float | None, bool]:
        """(confidence, accepted) for a non-final tier's answer. An answer that breaks the requested
        response_format (unparsable JSON, schema violation) or loops (routing.repetition) escalates
        whatever its confidence, its evidence in decision.evidence (VETO_EVIDENCE).
        Subclasses add signals here (routing.verifier.VerifiedCascadeRouter)."""
        conf = self._confidence(gen)
        if request.params.response_format is not None:
            from localroute.routing.response_format import schema_violation

            problem = schema_violation(request.params.response_format, gen.text)
            if problem is not None:
                decision.evidence.setdefault("schema_violations", {})[tier.name] = problem
        loop = self.repetition.find(gen.text)
        if loop is not None:
            decision.evidence.setdefault("repetition", {})[tier.name] = loop.as_evidence()
        if vetoed(decision, tier.name):
            return conf, False
        return conf, self._accepts(tier, conf)

    async def _buffered(
        self, request: GenerationRequest, decision: Decision, start: int
    ) -> tuple[Generation | None, int, _Fallback]:
        """Run non-final tiers from `start` until one accepts and return its answer; else None, the
        last tier's index, and the most recent rejected answer (the degraded fallback)."""
        last = len(self.tiers) - 1
        fallback: _Fallback = None
        for i in range(start, last):
            tier = self.tiers[i]
            try:
                gen = await tier.backend.generate(self._tier_request(request))
            except InvalidRequestError:
                raise
            except LocalrouteError as exc:
                decision.attempts.append(TierAttempt(tier.name, None, tier.threshold, False, error=exc.message))
                if isinstance(exc, EngineDeadError):  # skipped because it is down, not because it was unsure
                    decision.degraded = decision.degraded or f"{tier.name}_{exc.code}"
                continue
            conf, accepted = await self._judge(tier, request, gen, decision)
            decision.attempts.append(self._attempt(tier, gen, conf, accepted))
            if accepted:
                decision.answered_by = tier.name
                return gen, i, None
            fallback = (gen, tier.name)
        return None, last, fallback

    async def route(self, request: GenerationRequest, start: int = 0) -> Routed:
        decision = Decision(policy=self.policy, signal=self.signal)
        gen, index, fallback = await self._buffered(request, decision, start)
        if gen is not None:
            return Routed(gen, decision)
        tier = self.tiers[index]
        t0 = time.perf_counter()
        try:
            gen = await tier.backend.generate(self._tier_request(request))
        except InvalidRequestError:
            raise
        except LocalrouteError as exc:
            return self._degrade(decision, tier, exc, fallback, time.perf_counter() - t0)
        decision.attempts.append(self._attempt(tier, gen, self._confidence(gen), True))
        decision.answered_by = tier.name
        return Routed(gen, decision)

    def _degrade(self, decision: Decision, tier: Tier, exc: LocalrouteError, fallback: _Fallback,
                 latency_s: float = 0.0) -> Routed:
        """The last tier failed: answer with the latest earlier answer, flagged, or re-raise
        when there is none or the policy for this failure says fail."""
        decision.attempts.append(
            TierAttempt(tier.name, None, tier.threshold, False, latency_s=latency_s, error=exc.message)
        )
        policy = self.on_budget if exc.code == "budget_exceeded" else self.on_failure
        if fallback is None or policy != "degrade":
            raise exc
        gen, name = fallback
        decision.answered_by = name
        decision.degraded = f"{tier.name}_{exc.code or 'error'}"
        log.warning("tier %s failed (%s); answering from %s, degraded", tier.name, exc.code, name)
        return Routed(gen, decision)

    async def route_stream(self, request: GenerationRequest, start: int = 0) -> AsyncIterator[RoutedDelta]:
        decision = Decision(policy=self.policy, signal=self.signal)
        gen, index, fallback = await self._buffered(request, decision, start)
        if gen is not None:
            for delta in replay(gen):
                yield RoutedDelta(delta, decision)
            yield RoutedDelta(StreamDelta(text="", final=gen), decision, Routed(gen, decision))
            return
        tier = self.tiers[index]
        decision.answered_by = tier.name  # provisional, so headers can name the streaming tier
        sent = False
        t0 = time.perf_counter()
        try:
            async for delta in tier.backend.stream(self._tier_request(request)):
                if delta.final is not None:
                    final = delta.final
                    decision.attempts.append(self._attempt(tier, final, self._confidence(final), True))
                    decision.answered_by = tier.name
                    yield RoutedDelta(delta, decision, Routed(final, decision))
                    return
                sent = True
                yield RoutedDelta(delta, decision)
        except InvalidRequestError:
            raise
        except LocalrouteError as exc:
            if sent:
                raise  # bytes already went out: the server ends the stream with an error event
            routed = self._degrade(decision, tier, exc, fallback, time.perf_counter() - t0)
            for delta in replay(routed.generation):
                yield RoutedDelta(delta, decision)
            yield RoutedDelta(StreamDelta(text="", final=routed.generation), decision, routed)
