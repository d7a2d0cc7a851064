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

Two signals read only the part of the answer that carries the decision (answer_confidence with the
Generation's `extra`):

- label_confidence  log P(chosen label) normalised over the allowed labels, scored by the engine
                    at the label's position (backends/labels.py; Generation.extra["label"]).
                    An answer naming no allowed label scores -inf; a request without labels
                    falls back to mean_logprob.
- field_confidence  for structured answers (a JSON document, or `key: value` lines): the mean
                    logprob of each field's value-carrying tokens, leaving out keys, punctuation
                    and tokens the grammar forced (extra["forced_tokens"]); the answer scores the
                    least confident of its deciding fields (a tier's `confidence_fields`, else
                    all). An unstructured answer falls back to mean_logprob over unforced tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

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


# Signals that need more than the tokens: the engine's label scores, the grammar's forced tokens.
SIGNALS: tuple[str, ...] = ("label_confidence", "field_confidence")


def check_signal(name: str) -> None:
    """An unknown aggregator or signal name fails here (KeyError naming the known ones)."""
    if name not in AGGREGATORS and name not in SIGNALS:
        raise KeyError(f"unknown confidence aggregator {name!r}; one of {sorted(AGGREGATORS) + list(SIGNALS)}")


def _json_value_chars(s: str) -> list[str | None] | None:
    """Per character of a JSON document, the field whose value it belongs to (keys joined by `.`,
    array indices left out), None for keys, quotes, punctuation and spaces. None: not JSON."""
    head = s.lstrip()
    if not head or head[0] not in "{[":
        return None
    n = len(s)
    out: list[str | None] = [None] * n
    stack: list[list[str | None]] = []  # [kind ("o" | "a"), current key]
    expect_key = False

    def path() -> str:
        return ".".join(k for kind, k in stack if kind == "o" and k is not None) or "$"

    i = 0
    while i < n:
        c = s[i]
        if c == '"':
            j = i + 1
            while j < n and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            if stack and stack[-1][0] == "o" and expect_key:
                stack[-1][1] = s[i + 1:j]
                expect_key = False
            else:
                name = path()
                for k in range(i + 1, min(j, n)):
                    out[k] = name
            i = j + 1
            continue
        if c == "{":
            stack.append(["o", None])
            expect_key = True
        elif c == "[":
            stack.append(["a", None])
            expect_key = False
        elif c in "}]":
            if stack:
                stack.pop()
            expect_key = False
        elif c == ",":
            expect_key = bool(stack) and stack[-1][0] == "o"
        elif c == ":" or c.isspace():
            expect_key = expect_key and c != ":"
        else:  # a number, true, false, null
            j = i
            while j < n and s[j] not in ",}] \n\t\r":
                j += 1
            name = path()
            for k in range(i, j):
                out[k] = name
            i = j
            continue
        i += 1
    return out


_LINE_FIELD = re.compile(r"^[ \t]*([A-Za-z_][\w \-]{0,39}?)[ \t]*:[ \t]*(\S.*?)[ \t]*$", re.MULTILINE)


def _line_value_chars(s: str) -> list[str | None] | None:
    """`key: value` lines (the spans tasks' answer format): each value's characters under its key."""
    found = list(_LINE_FIELD.finditer(s))
    if not found or any(line.strip() and not _LINE_FIELD.fullmatch(line) for line in s.splitlines()):
        return None
    out: list[str | None] = [None] * len(s)
    for m in found:
        name = m.group(1).strip().casefold()
        for k in range(m.start(2), m.end(2)):
            out[k] = name
    return out


def field_confidences(tokens: Sequence[TokenLogprob], forced: Sequence[int] = ()) -> dict[str, float] | None:
    """Mean logprob of each field's value-carrying, unforced tokens; None when the answer is not
    structured. Read from the tokens' own text (so a served answer and its eval-run record, which
    keeps no bytes, give the same numbers); a token counts for the first field it carries."""
    text = "".join(t.token for t in tokens)
    chars = _json_value_chars(text)
    if chars is None:
        chars = _line_value_chars(text)
    if chars is None:
        return None
    skip = set(forced)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    pos = 0
    for i, t in enumerate(tokens):
        end = pos + len(t.token)
        name = next((c for c in chars[pos:end] if c is not None), None)
        pos = end
        if name is None:
            continue
        sums.setdefault(name, 0.0)
        counts.setdefault(name, 0)
        if i in skip:
            continue
        sums[name] += t.logprob
        counts[name] += 1
    return {k: (sums[k] / counts[k] if counts[k] else 0.0) for k in sums}


def field_confidence(tokens: Sequence[TokenLogprob], forced: Sequence[int] = (),
                     fields: Sequence[str] = ()) -> float:
    """The least confident deciding field (`fields`, else every field; a named field the answer
    lacks scores -inf); unstructured answers: mean logprob of the unforced tokens."""
    if not tokens:
        return NEG_INF
    per_field = field_confidences(tokens, forced)
    if per_field is None or not per_field:
        skip = set(forced)
        kept = [t for i, t in enumerate(tokens) if i not in skip]
        return mean_logprob(kept) if kept else 0.0
    if fields:
        return min(per_field.get(f, NEG_INF) for f in fields)
    return min(per_field.values())


def label_confidence(tokens: Sequence[TokenLogprob], extra: dict[str, Any] | None) -> float:
    """The engine's normalised log P(chosen label); -inf when labels were known but the answer
    named none (or scoring failed); mean_logprob when the request had no labels."""
    label = (extra or {}).get("label")
    if not isinstance(label, dict):
        return mean_logprob(tokens)
    value = label.get("logprob")
    return NEG_INF if value is None else float(value)


def signal_used(name: str, tokens: Sequence[TokenLogprob], text: str = "",
                extra: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """(the signal answer_confidence(name, ...) actually read, why it is not `name`; None: it is).

    label_confidence reads mean_logprob when there are no label scores (the request named no
    labels, or the tier scores none), and scores -inf ("none": the answer escalates) when labels
    were known but the answer named none or they could not be scored. An answer without token
    logprobs is "none" too: -inf when empty, else no confidence (None, which meets no threshold)."""
    if not tokens:
        return "none", "the answer came without token logprobs" if text else "empty answer"
    if name != "label_confidence":
        return name, None
    label = (extra or {}).get("label")
    if not isinstance(label, dict):
        return "mean_logprob", "no label scores: the request named no labels, or this tier scores none"
    if label.get("logprob") is None:
        if label.get("chosen") is None:
            return "none", "the answer names none of the allowed labels"
        return "none", f"the labels could not be scored: {label.get('error') or 'no score'}"
    return "label_confidence", None


def get_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise KeyError(f"unknown confidence aggregator {name!r}; one of {sorted(AGGREGATORS)}") from None


def answer_confidence(name: str, tokens: Sequence[TokenLogprob], alpha: float, text: str = "",
                      extra: dict[str, Any] | None = None, fields: Sequence[str] = ()) -> float | None:
    """A tier's confidence in one answer, as `serve` (the cascade) and `calibrate` (eval runs) both
    compute it. None: text came without token logprobs (a backend that gives none), no evidence
    either way; -inf: an empty answer. `extra`: the Generation's (label scores, forced tokens);
    `fields`: the tier's deciding fields (field_confidence)."""
    if not tokens:
        return None if text else NEG_INF
    if name == "label_confidence":
        return label_confidence(tokens, extra)
    if name == "field_confidence":
        return field_confidence(tokens, (extra or {}).get("forced_tokens") or (), fields)
    return get_aggregator(name)(tokens, alpha)


def confidence(name: str, tokens: Sequence[TokenLogprob], alpha: float = 0.1) -> float:
    """Apply the named aggregator."""
    return get_aggregator(name)(tokens, alpha)


def all_confidences(tokens: Sequence[TokenLogprob], alpha: float = 0.1) -> dict[str, float]:
    """Every aggregator at once (evaluation rescoring)."""
    return {name: fn(tokens, alpha) for name, fn in AGGREGATORS.items()}
