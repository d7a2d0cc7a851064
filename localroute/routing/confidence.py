"""Confidence aggregators: one number per answer from its token logprobs. Higher is surer.

Every aggregator maps the per-token evidence of one answer to a float in (-inf, 0] (or a margin
>= 0), where a larger value means the tier is more confident. The cascade escalates when the value
is below the tier's threshold. An answer with no tokens has no evidence and scores -inf.

- sum_logprob       Chow-Sum: the log-probability of the whole answer. Penalises length.
- mean_logprob      Chow-Average: the per-token geometric mean, length-neutral.
- min_logprob       the least likely token: one bad token sinks the answer.
- quantile_logprob  the alpha-quantile of token logprobs (alpha=0: min, 0.5: median).
- mean_margin       mean of top1 - top2 logprob: how decisively each token won. Needs top-k >= 2.
- neg_mean_entropy  minus the mean entropy of the renormalised top-5 distribution per token.

Each aggregator reads exactly the alternatives it names (TOP_K_NEEDED, most likely first, as the
engines return them) and ignores any further ones, so an answer scores the same whether the engine
was asked for 5 alternatives (`localroute eval`) or for 20 (a client's top_logprobs in `serve`):
the threshold `calibrate` fits on recorded answers is the one the cascade compares with.
`answer_confidence` is the one computation both use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from localroute.types import TokenLogprob

Aggregator = Callable[[Sequence[TokenLogprob], float], float]

NEG_INF = float("-inf")
ENTROPY_TOP_K = 5


def sum_logprob(tokens: Sequence[TokenLogprob], alpha: float = 0.0) -> float:
    """Chow-Sum: log P(answer)."""
    return float(sum(t.logprob for t in tokens)) if tokens else NEG_INF


def mean_logprob(tokens: Sequence[TokenLogprob], alpha: float = 0.0) -> float:
    """Chow-Average: mean token logprob."""
    return sum_logprob(tokens) / len(tokens) if tokens else NEG_INF


def min_logprob(tokens: Sequence[TokenLogprob], alpha: float = 0.0) -> float:
    """The least likely generated token."""
    return float(min(t.logprob for t in tokens)) if tokens else NEG_INF


def quantile_logprob(tokens: Sequence[TokenLogprob], alpha: float = 0.1) -> float:
    """alpha-quantile of token logprobs (linear interpolation)."""
    if not tokens:
        return NEG_INF
    return float(np.quantile(np.fromiter((t.logprob for t in tokens), dtype=np.float64), alpha))


def mean_margin(tokens: Sequence[TokenLogprob], alpha: float = 0.0) -> float:
    """Mean of top1 - top2 logprob. Tokens without two alternatives count the chosen token's
    distance to certainty instead (-logprob is 0 for a sure token)."""
    if not tokens:
        return NEG_INF
    margins = []
    for t in tokens:
        if len(t.top_logprobs) >= 2:
            margins.append(t.top_logprobs[0].logprob - t.top_logprobs[1].logprob)
        else:
            # log p - log(1 - p): the margin against everything else combined
            p = min(math.exp(t.logprob), 1 - 1e-12)
            margins.append(math.log(p) - math.log1p(-p))
    return float(sum(margins) / len(margins))


def neg_mean_entropy(tokens: Sequence[TokenLogprob], alpha: float = 0.0) -> float:
    """-mean entropy (nats) of each token's top-5 distribution (ENTROPY_TOP_K), renormalised over
    those alternatives; fewer shown, fewer used."""
    if not tokens:
        return NEG_INF
    total = 0.0
    for t in tokens:
        top = t.top_logprobs[:ENTROPY_TOP_K]
        lps = np.array([a.logprob for a in top] or [t.logprob], dtype=np.float64)
        p = np.exp(lps - lps.max())
        p /= p.sum()
        total += float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
    return -total / len(tokens)


AGGREGATORS: dict[str, Aggregator] = {
    "sum_logprob": sum_logprob,
    "mean_logprob": mean_logprob,
    "min_logprob": min_logprob,
    "quantile_logprob": quantile_logprob,
    "mean_margin": mean_margin,
    "neg_mean_entropy": neg_mean_entropy,
}

# How many alternatives per token each aggregator needs from the engine.
TOP_K_NEEDED: dict[str, int] = {"mean_margin": 2, "neg_mean_entropy": ENTROPY_TOP_K}


def get_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise KeyError(f"unknown confidence aggregator {name!r}; one of {sorted(AGGREGATORS)}") from None


def answer_confidence(name: str, tokens: Sequence[TokenLogprob], alpha: float, text: str = "") -> float | None:
    """A tier's confidence in one answer, as `serve` (the cascade) and `calibrate` (eval runs) both
    compute it. None: text came without token logprobs (a backend that gives none), no evidence
    either way; -inf: an empty answer."""
    if not tokens:
        return None if text else NEG_INF
    return get_aggregator(name)(tokens, alpha)


def confidence(name: str, tokens: Sequence[TokenLogprob], alpha: float = 0.1) -> float:
    """Apply the named aggregator."""
    return get_aggregator(name)(tokens, alpha)


def all_confidences(tokens: Sequence[TokenLogprob], alpha: float = 0.1) -> dict[str, float]:
    """Every aggregator at once (evaluation rescoring)."""
    return {name: fn(tokens, alpha) for name, fn in AGGREGATORS.items()}
