"""Policies that decide before inference, and their composition with the cascade.

- `localroute/classifier`: P(good) per tier from the query alone; the cheapest tier whose P(good)
  reaches the threshold answers, alone. No cheap answer is paid for first.
- `localroute/embedding`: the same rule on the similarity-weighted success of the k nearest past
  queries; a novel query (nearest neighbour too far) goes to the cascade.
- `localroute/hybrid`: embedding first, then classifier; a query that is novel to the index and
  uncertain for the classifier (P(good) within `margin` of the threshold) goes to the cascade,
  which judges the cheap answer itself. Confident pre-decisions skip the cheap attempt entirely.

Every decision carries its evidence (`router_score` = P(cheapest tier good), per-tier P(good),
novelty, nearest similarity) so `localroute calibrate` and the routing log can use the score.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from localroute.embeddings import Encoder, request_text
from localroute.routing.base import Decision, Routed, RoutedDelta, Router, Tier
from localroute.routing.cascade import CascadeRouter
from localroute.types import GenerationRequest

if TYPE_CHECKING:
    from localroute.settings import Settings

log = logging.getLogger(__name__)


class ScoringModel(Protocol):
    kind: str
    tiers: list[str]
    encoder_name: str
    artifact: Any

    def score(self, v: np.ndarray) -> dict[str, Any]:
        ...


@dataclass(slots=True)
class PreDecision:
    """Which tier (index into the serving ladder) answers, or None: let the cascade decide."""

    tier_index: int | None
    evidence: dict[str, Any]


def tier_mapping(model_tiers: Sequence[str], ladder: Sequence[str]) -> list[int]:
    """Ladder index for each of the model's tiers: by name where names match, else by position
    (cheapest -> cheapest, strongest -> strongest), so a router trained on another model pair
    (e.g. RouteLLM's Mixtral/GPT-4) maps onto the local ladder's cheap and strong ends."""
    if all(t in ladder for t in model_tiers):
        return [list(ladder).index(t) for t in model_tiers]
    n, m = len(model_tiers), len(ladder)
    if n == 1:
        return [0]
    return [round(i * (m - 1) / (n - 1)) for i in range(n)]


class VectorMemo:
    """One request's embeddings, by (encoder, request id, text digest): a request placed in a
    category by its neighbours (routing/categories.py) is embedded once, not again by the embedding
    policy that routes it. Keyed by the request, not the text alone, so no request is ever answered
    from another's vector (no timing signal of what others asked) and no prompt text is kept; at most
    `size` vectors, taken once. Thread-safe (both embed in worker threads); a miss only costs an encode."""

    def __init__(self, size: int = 64) -> None:
        from collections import OrderedDict
        from threading import Lock

        self.size = size
        self._items: OrderedDict[tuple[str, str, bytes], np.ndarray] = OrderedDict()
        self._lock = Lock()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._items)

    def encode(self, name: str, encoder: Encoder, text: str, request_id: str) -> np.ndarray:
        import hashlib

        if not request_id:  # a request without an id (code, evals) is nobody's to share with
            return np.asarray(encoder.encode([text])[0])
        key = (name, request_id, hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        with self._lock:
            found = self._items.pop(key, None)
            if found is not None:
                self.hits += 1
                return found
        vector: np.ndarray = np.asarray(encoder.encode([text])[0])
        vector.setflags(write=False)  # shared by the request's two readers
        with self._lock:
            self._items[key] = vector
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return vector


class PreRouter:
    """Decide from the query before inference; fall back to the cascade when the model abstains."""

    def __init__(
        self,
        policy: str,
        models: Sequence[ScoringModel],
        encoders: dict[str, Encoder],
        tiers: Sequence[Tier],
        cascade: CascadeRouter,
        threshold: float = 0.5,
        margin: float = 0.0,
        memo: VectorMemo | None = None,
    ) -> None:
        if not models:
            raise ValueError("a pre-inference router needs at least one trained model")
        self.policy = policy
        self.models = list(models)
        self.encoders = encoders
        self.memo = memo
        self.tiers = list(tiers)
        self.cascade = cascade
        self.threshold = threshold
        self.margin = margin
        names = [t.name for t in self.tiers]
        self._maps = [tier_mapping(m.tiers, names) for m in self.models]
        self._single = {i: CascadeRouter([Tier(t.name, t.backend, None, t.capabilities)], cascade.aggregator,
                                         cascade.alpha, policy=policy, fields=cascade.fields)
                        for i, t in enumerate(self.tiers)}
        self.signal = "+".join(m.kind for m in self.models)

    def _decide_from(self, model: ScoringModel, mapping: list[int], v: np.ndarray) -> PreDecision:
        s = model.score(v)
        p = s["p_good"]
        evidence = {"router": model.kind, "encoder": model.encoder_name, "router_score": p[0],
                    "p_good": dict(zip(model.tiers, p)), "novel": s["novel"],
                    "nearest_similarity": s["nearest_similarity"], "threshold": self.threshold}
        if s["novel"]:
            return PreDecision(None, evidence | {"abstained": "novel"})
        for j, pj in enumerate(p[:-1]):
            if abs(pj - self.threshold) < self.margin:
                return PreDecision(None, evidence | {"abstained": "uncertain"})
            if pj >= self.threshold:
                return PreDecision(mapping[j], evidence)
        return PreDecision(mapping[-1], evidence)

    def decide_vectors(self, vectors: dict[str, np.ndarray]) -> PreDecision:
        """The first model that does not abstain decides; all abstain: the cascade does."""
        last: dict[str, Any] = {}
        for model, mapping in zip(self.models, self._maps):
            pre = self._decide_from(model, mapping, vectors[model.encoder_name])
            if pre.tier_index is not None:
                return pre
            last = pre.evidence
        return PreDecision(None, last)

    def _embed(self, text: str, request_id: str = "") -> dict[str, np.ndarray]:
        memo = self.memo
        return {name: memo.encode(name, enc, text, request_id) if memo is not None else enc.encode([text])[0]
                for name, enc in self.encoders.items() if any(m.encoder_name == name for m in self.models)}

    async def decide(self, request: GenerationRequest) -> PreDecision:
        text = request_text(request.messages, request.prompt)
        vectors = await asyncio.to_thread(self._embed, text, request.request_id)  # CPU work off the event loop
        return self.decide_vectors(vectors)

    def _stamp(self, decision: Decision, pre: PreDecision) -> None:
        decision.policy = self.policy
        decision.signal = self.signal if pre.tier_index is not None else f"{self.signal}>{decision.signal}"
        decision.evidence.update(pre.evidence)

    def _router(self, request: GenerationRequest, pre: PreDecision) -> CascadeRouter:
        """The chosen tier alone, unless it cannot serve the request (tools, images...): the cascade."""
        if pre.tier_index is None or self.tiers[pre.tier_index].lacks(request.needs):
            return self.cascade
        return self._single[pre.tier_index]

    async def route(self, request: GenerationRequest) -> Routed:
        pre = await self.decide(request)
        router = self._router(request, pre)
        routed = await router.route(request)
        self._stamp(routed.decision, pre)
        return routed

    async def route_stream(self, request: GenerationRequest) -> AsyncIterator[RoutedDelta]:
        pre = await self.decide(request)
        router = self._router(request, pre)
        stamped = False
        async for item in router.route_stream(request):
            if not stamped:
                self._stamp(item.decision, pre)
                stamped = True
            yield item


def load_models(settings: Any) -> tuple[dict[str, ScoringModel], dict[str, Encoder]]:
    """The pre-inference routers the settings name (embedding first: the order /hybrid asks them
    in) and the encoders they need, checked against each other."""
    from localroute.embeddings import load_encoder
    from localroute.errors import ConfigError
    from localroute.routing.artifacts import load_artifact
    from localroute.routing.classifier import ClassifierModel
    from localroute.routing.embedding import EmbeddingModel

    models: dict[str, ScoringModel] = {}
    if settings.router_embedding_path is not None:
        art = load_artifact(settings.router_embedding_path, "embedding")
        models["embedding"] = EmbeddingModel(art, novelty_similarity=settings.router_novelty_similarity,
                                             categories=settings.category_neighbours_k > 0)
    if settings.router_classifier_path is not None:
        models["classifier"] = ClassifierModel(load_artifact(settings.router_classifier_path, "classifier"))
    encoders = {name: load_encoder(name, settings.llama_extra_buffers)
                for name in sorted({m.encoder_name for m in models.values()})}
    for name, enc in encoders.items():
        for m in models.values():
            if m.encoder_name == name and m.artifact.dim != enc.dim:
                raise ConfigError(f"{m.kind} router was trained on {m.artifact.dim}-d vectors but encoder "
                                  f"{name} gives {enc.dim}", param="router")
    return models, encoders


def router_scores(models: Sequence[ScoringModel], vectors: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """Per query, P(cheapest tier good) from the first model for which it is not novel, as the
    policy asks them; -inf where every model finds it novel (the cascade takes it: never kept)."""
    out = np.full(len(vectors), -np.inf)
    for i, v in enumerate(vectors):
        for model in models:
            s = model.score(v[model.encoder_name])
            if not s["novel"]:
                out[i] = float(s["p_good"][0])
                break
    return out


def _places_categories(settings: Any, models: Iterable[Any]) -> bool:
    """Category neighbours will run: on (`category_neighbours_k` > 0) with a loaded embedding model
    that has labelled rows."""
    from localroute.routing.embedding import EmbeddingModel

    return settings.category_neighbours_k > 0 and any(
        isinstance(m, EmbeddingModel) and m.category_neighbours is not None for m in models)


def category_neighbours(settings: Any, routers: dict[str, Any]) -> Any:
    """The neighbour categoriser (routing/categories.py `NeighbourCategories`) when an embedding
    router trained on rows with categories is loaded and `category_neighbours_k` > 0; else None.
    It shares the router's loaded index and encoder."""
    from localroute.routing.categories import NeighbourCategories
    from localroute.routing.embedding import EmbeddingModel

    if settings.category_neighbours_k <= 0:
        return None
    for router in routers.values():
        if not isinstance(router, PreRouter):
            continue
        for model in router.models:
            if isinstance(model, EmbeddingModel) and model.category_neighbours is not None:
                return NeighbourCategories(model, router.encoders[model.encoder_name], settings.category_neighbours_k,
                                           settings.category_neighbours_min_similarity, router.memo)
    return None


def calibrated_router_threshold(settings: Any, models: dict[str, ScoringModel]) -> float:
    """settings.router_threshold, unless the calibration file holds a router threshold fitted on
    these very artefacts (same file hashes); a stale one is ignored with a warning."""
    from localroute.calibration_file import router_threshold_from

    if settings.calibration_path is None or not models:
        return float(settings.router_threshold)
    found = router_threshold_from(settings.calibration_path, {k: m.artifact.path for k, m in models.items()})
    return float(settings.router_threshold) if found is None else found


def build_policies(settings: Settings, tiers: Sequence[Tier], cascade: CascadeRouter) -> dict[str, Router]:
    """The extra policies the settings enable, by model id (the server adds them to its routers)."""
    from localroute.errors import ConfigError

    policies: dict[str, Any] = {}
    models, encoders = load_models(settings)
    thr = calibrated_router_threshold(settings, models)
    # one for every policy and the category neighbours (a request is embedded once); none when no
    # category neighbours will run, so the policies then pay nothing for it
    memo = VectorMemo() if _places_categories(settings, models.values()) else None
    for kind, model in models.items():
        policies[f"localroute/{kind}"] = PreRouter(f"localroute/{kind}", [model], encoders, tiers, cascade, thr,
                                                   memo=memo)
    if models:
        ordered = [models[k] for k in ("embedding", "classifier") if k in models]
        policies["localroute/hybrid"] = PreRouter("localroute/hybrid", ordered, encoders, tiers, cascade, thr,
                                                  settings.router_uncertainty_margin, memo=memo)
    if settings.verifier_tier is not None:
        from localroute.routing.repetition import RepetitionCheck
        from localroute.routing.verifier import VerifiedCascadeRouter, Verifier

        judge = next((t for t in tiers if t.name == settings.verifier_tier), None)
        if judge is None:
            raise ConfigError(f"verifier_tier {settings.verifier_tier!r} is not a tier", param="verifier_tier")
        policies["localroute/verified"] = VerifiedCascadeRouter(
            tiers, Verifier(judge.backend), settings.confidence_aggregator, settings.confidence_quantile_alpha,
            "localroute/verified", settings.verifier_mode, settings.verifier_threshold,
            on_failure=settings.escalation_failure_policy, on_budget=settings.budget_exhausted_policy,
            repetition=RepetitionCheck(settings.repetition_min_repeats, settings.repetition_min_coverage),
            early_escalation=settings.early_escalation, fields=cascade.fields)
    return policies
