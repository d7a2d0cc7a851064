"""Cascade: each tier answers in turn until one is confident enough; the last tier always answers.

Streaming never shows tokens of an answer that is later replaced: a non-final tier's answer is
generated in full (buffered) and its confidence computed before the first byte is sent. The cost
is time-to-first-token: a streamed request that stays local sees its first token only once the
local answer is complete (its whole decode time); an escalated one pays the local decode time plus
the next tier's own TTFT. Only the last tier streams token by token as it decodes.

Capabilities: a tier that lacks what the request needs (tools, images, n > 1, ... : request.needs)
is skipped, and so is a non-final tier whose context the prompt does not fit; the reason is in
`decision.evidence["skipped"]` ({tier: need}). The last tier that can serve the request is the one
whose answer is always returned; none can: 400 `unsupported_capability` naming what is missing.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace

from localroute.backends.capabilities import NEEDS, configure_hint
from localroute.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    InvalidRequestError,
    LocalrouteError,
    UnsupportedCapabilityError,
)
from localroute.routing.base import Decision, Routed, RoutedDelta, Tier, TierAttempt, finite
from localroute.routing.confidence import (
    TOP_K_NEEDED,
    answer_confidence,
    check_signal,
    field_confidences,
    signal_used,
)
from localroute.routing.repetition import RepetitionCheck
from localroute.types import EscalationBound, Generation, GenerationRequest, StreamDelta

log = logging.getLogger(__name__)

_Fallback = tuple[Generation, str] | None

# decision.evidence keys of the checks that reject an answer whatever its confidence
VETO_EVIDENCE = ("schema_violations", "repetition", "truncated_tool_call")


def vetoed(decision: Decision, tier: str) -> bool:
    """Whether a veto check (VETO_EVIDENCE) rejected this tier's answer."""
    return any(tier in decision.evidence.get(key, {}) for key in VETO_EVIDENCE)


def replay(gen: Generation) -> Iterator[StreamDelta]:
    """A buffered answer as stream deltas, one per token, UTF-8 safe, text identical to gen.text.
    n > 1: each choice in turn, by its index, each but the last followed by its finish delta (the
    last one's finish goes with the final delta). A remote tier's answer kept as sent (gen.raw)
    yields nothing here: the server streams it whole from the final delta (tool calls, refusals,
    every choice)."""
    if gen.raw is not None:
        return
    every = (gen, *gen.choices)
    for index, g in enumerate(every):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        emitted = 0
        for tok in g.tokens:
            raw = bytes(tok.bytes) if tok.bytes is not None else tok.token.encode()
            piece = decoder.decode(raw)
            piece = g.text[emitted : emitted + len(piece)]
            emitted += len(piece)
            yield StreamDelta(text=piece, token=tok, index=index)
        if emitted < len(g.text):
            yield StreamDelta(text=g.text[emitted:], index=index)
        if index < len(every) - 1:
            yield StreamDelta(text="", index=index, finish_reason=g.finish_reason)


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
        early_escalation: bool = True,
        fields: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """`on_failure` ('degrade' | 'fail') and `on_budget` ('degrade' | 'reject') say what a
        failed last tier yields when an earlier answer exists: that answer, flagged degraded, or
        the last tier's own error (502/503, or 429 budget_exceeded). `repetition`: the loop
        check's thresholds (default RepetitionCheck()). `early_escalation`: a non-final local
        tier stops decoding once its threshold is out of reach (types.EscalationBound; the same
        decisions, less local time on escalated answers). `fields`: per tier, the fields whose
        confidence decides (field_confidence; default every field)."""
        if not tiers:
            raise ValueError("a cascade needs at least one tier")
        self.tiers = list(tiers)
        self.signal = aggregator  # what the decision reports; subclasses add theirs (verifier)
        self.aggregator = aggregator
        check_signal(aggregator)  # an unknown name fails here, at construction
        self._alpha = alpha
        self.early_escalation = early_escalation
        self.fields = dict(fields or {})
        self._top_k = TOP_K_NEEDED.get(aggregator, 0)
        self.policy = policy
        self.on_failure = on_failure
        self.on_budget = on_budget
        self.repetition = repetition if repetition is not None else RepetitionCheck()

    @property
    def alpha(self) -> float:
        """The quantile aggregators' alpha (what a router sharing this one's signal needs)."""
        return self._alpha

    def _confidence(self, gen: Generation, tier: Tier | None = None, decision: Decision | None = None) -> float | None:
        """The aggregate of the answer's logprobs (`answer_confidence`, as calibration computes it).
        An answer that came without logprobs from a remote tier (a tool call, a provider's raw
        answer) is None: no evidence either way; an empty local answer is -inf (it escalates).
        With `decision`: where the aggregator may read another signal than its own (label_confidence
        without label scores), evidence["signal_used"][tier] says which one it read, and why.
        n > 1 (gen.choices): the lowest choice's. The client gets every choice, so the answer is
        only as trustworthy as its weakest one: it stays on this tier only if every choice passes
        the threshold, else the whole request escalates (the next tier answers all n); with
        `decision`, evidence["choices"][tier] lists each choice's index, confidence and finish_reason."""
        if decision is not None and tier is not None and self.aggregator == "label_confidence":
            used, why = signal_used(self.aggregator, gen.tokens, gen.text, gen.extra)
            decision.evidence.setdefault("signal_used", {})[tier.name] = {"signal": used, **({"why": why} if why else {})}
        if not gen.tokens and (gen.raw is not None or (tier is not None and not tier.backend.is_local)):
            return None
        fields = self.fields.get(tier.name, ()) if tier is not None else ()
        every = (gen, *gen.choices)
        confs = [answer_confidence(self.aggregator, g.tokens, self._alpha, g.text, g.extra, fields) for g in every]
        if gen.choices and decision is not None and tier is not None:  # which choice decided, and how each ended
            decision.evidence.setdefault("choices", {})[tier.name] = [
                {"index": i, "confidence": finite(c), "finish_reason": g.finish_reason}
                for i, (g, c) in enumerate(zip(every, confs, strict=True))]
        known = [c for c in confs if c is not None]
        return min(known) if len(known) == len(confs) else None

    def _ladder(self, request: GenerationRequest, decision: Decision, start: int) -> list[Tier]:
        """The tiers from `start` that can serve the request, those that cannot in the evidence;
        none: UnsupportedCapabilityError naming the need no tier (or no single tier) has."""
        tiers = self.tiers if start == 0 else self.tiers[start:]
        if not request.needs:
            return tiers
        able = []
        for tier in tiers:
            need = tier.lacks(request.needs)
            if need is None:
                able.append(tier)
            else:
                decision.evidence.setdefault("skipped", {})[tier.name] = need
        if not able:
            raise unsupported(request.needs, decision.evidence["skipped"])
        return able

    def _tier_request(self, request: GenerationRequest, tier: Tier | None = None,
                      threshold: float | None = None) -> GenerationRequest:
        """What a tier is asked: at least the aggregator's top-k (it reads exactly that many, so a
        client's larger top_logprobs changes nothing), and for a non-final local tier the
        early-escalation bound at `threshold`, the attempt's (`tier` given only for those; no
        threshold given: the tier's for the request category)."""
        if request.params.top_logprobs < self._top_k:
            request = replace(request, params=replace(request.params, top_logprobs=self._top_k))
        if request.score_labels and self.aggregator != "label_confidence":  # label scores would decide nothing
            request = replace(request, score_labels=False)
        if tier is not None and threshold is None:
            threshold = tier.threshold_for(request.category)
        bound = self._bound(tier, threshold) if tier is not None else None
        if bound is not None:
            request = replace(request, escalate_below=bound)
        return request

    def _bound(self, tier: Tier, threshold: float | None) -> EscalationBound | None:
        """The acceptance test a non-final local tier's engine may stop on (the attempt's threshold:
        the request category's, the one `_accepts` applies); None: decode in full."""
        if not self.early_escalation or threshold is None or not tier.backend.is_local:
            return None
        return EscalationBound(self.aggregator, threshold, self._alpha)

    def _attempt(self, tier: Tier, gen: Generation, conf: float | None, accepted: bool,
                 threshold: float | None = None) -> TierAttempt:
        return TierAttempt(
            tier=tier.name,
            confidence=conf,
            threshold=threshold,
            accepted=accepted,
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            latency_s=gen.latency_s,
            ttft_s=gen.ttft_s,
        )

    @staticmethod
    def _accepts(conf: float | None, threshold: float | None) -> bool:
        """`threshold`: the attempt's, the request category's calibrated one (issue 19)."""
        return threshold is None or (conf is not None and conf >= threshold)

    async def _judge(
        self, tier: Tier, request: GenerationRequest, gen: Generation, decision: Decision, threshold: float | None
    ) -> tuple[float | None, bool]:
        """(confidence, accepted) for a non-final tier's answer. An answer that breaks the requested
        response_format (unparsable JSON, schema violation), loops (routing.repetition) or is a tool
        call cut by max_tokens escalates whatever its confidence, its evidence in decision.evidence
        (VETO_EVIDENCE). An answer the engine stopped early (gen.extra["early_exit"]: its threshold was already out
        of reach) escalates at once. Subclasses add signals here (routing.verifier.VerifiedCascadeRouter)."""
        conf = self._confidence(gen, tier, decision)
        early = gen.extra.get("early_exit")
        if early is not None:
            decision.evidence.setdefault("early_exit", {})[tier.name] = early
            return conf, False
        label = gen.extra.get("label")
        if isinstance(label, dict) and label.get("chosen") is not None:
            decision.evidence.setdefault("label", {})[tier.name] = {
                "chosen": label["chosen"], "logprob": finite(label.get("logprob")), "n_labels": label.get("n_labels")}
        fmt = request.params.response_format
        if fmt is not None and fmt.get("type") in ("json_object", "json_schema"):
            per_field = field_confidences(gen.tokens, gen.extra.get("forced_tokens") or ())
            if per_field:
                decision.evidence.setdefault("fields", {})[tier.name] = {k: round(v, 6) for k, v in per_field.items()}
        for g in (gen, *gen.choices):  # n > 1: a veto on any choice rejects the answer
            if request.params.response_format is not None:
                from localroute.routing.response_format import schema_violation

                problem = schema_violation(request.params.response_format, g.text)
                if problem is not None:
                    decision.evidence.setdefault("schema_violations", {})[tier.name] = problem
            if request.tools and g.finish_reason == "length":  # a call cut by max_tokens is no call
                decision.evidence.setdefault("truncated_tool_call", {})[tier.name] = g.completion_tokens
            loop = self.repetition.find(g.text)
            if loop is not None:
                decision.evidence.setdefault("repetition", {})[tier.name] = loop.as_evidence()
        if vetoed(decision, tier.name):
            return conf, False
        return conf, self._accepts(conf, threshold)

    async def _buffered(
        self, request: GenerationRequest, decision: Decision, ladder: list[Tier]
    ) -> tuple[Generation | None, Tier, _Fallback]:
        """Run the ladder's non-final tiers until one accepts and return its answer; else None, the
        last tier, and the most recent rejected answer (the degraded fallback)."""
        fallback: _Fallback = None
        for tier in ladder[:-1]:
            threshold = tier.threshold_for(request.category)  # read once: a reload mid-attempt changes nothing
            try:
                gen = await tier.backend.generate(self._tier_request(request, tier, threshold))
            except ContextLengthExceededError:  # the next tier may have room
                decision.evidence.setdefault("skipped", {})[tier.name] = "context_length"
                continue
            except InvalidRequestError:
                raise
            except LocalrouteError as exc:
                decision.attempts.append(TierAttempt(tier.name, None, threshold, False, error=exc.message))
                if isinstance(exc, EngineDeadError):  # skipped because it is down, not because it was unsure
                    decision.degraded = decision.degraded or f"{tier.name}_{exc.code}"
                continue
            conf, accepted = await self._judge(tier, request, gen, decision, threshold)
            decision.attempts.append(self._attempt(tier, gen, conf, accepted, threshold))
            if accepted:
                decision.answered_by = tier.name
                return gen, tier, None
            fallback = (gen, tier.name)
        return None, ladder[-1], fallback

    async def route(self, request: GenerationRequest, start: int = 0) -> Routed:
        decision = Decision(policy=self.policy, signal=self.signal)
        gen, tier, fallback = await self._buffered(request, decision, self._ladder(request, decision, start))
        if gen is not None:
            return Routed(gen, decision)
        t0 = time.perf_counter()
        try:
            gen = await tier.backend.generate(self._tier_request(request))
        except InvalidRequestError:
            raise
        except LocalrouteError as exc:
            return self._degrade(decision, tier, exc, fallback, time.perf_counter() - t0)
        decision.attempts.append(self._attempt(tier, gen, self._confidence(gen, tier, decision), True, tier.threshold))
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
        gen, tier, fallback = await self._buffered(request, decision, self._ladder(request, decision, start))
        if gen is not None:
            for delta in replay(gen):
                yield RoutedDelta(delta, decision)
            yield RoutedDelta(StreamDelta(text="", final=gen), decision, Routed(gen, decision))
            return
        decision.answered_by = tier.name  # provisional, so headers can name the streaming tier
        sent = False
        t0 = time.perf_counter()
        try:
            async for delta in tier.backend.stream(self._tier_request(request)):
                if delta.final is not None:
                    final = delta.final
                    decision.attempts.append(self._attempt(tier, final, self._confidence(final, tier, decision),
                                                           True, tier.threshold))
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


def unsupported(needs: frozenset[str], skipped: dict[str, str]) -> UnsupportedCapabilityError:
    """The 400 for a request no tier can serve: each tier and the need it lacks."""
    first = next(iter(skipped.values()))
    reasons = ", ".join(f"{tier} lacks {need}" for tier, need in skipped.items())
    return UnsupportedCapabilityError(
        f"no tier can serve this request ({reasons}); {configure_hint(skipped.values())}",
        param=NEEDS[first][1] if first in NEEDS else None)
