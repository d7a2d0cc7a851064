"""Degenerate repetition: an answer that loops ("la Femme, la Femme, la Femme, ...").

A small model that loses the thread often repeats a phrase until max_tokens, and it does so
*confidently*: each repeat makes the next one likelier, so the token logprobs rise as the answer
gets worse (issue 13: accepted at mean logprob -0.375 against a threshold of -1.0). The cascade
therefore rejects a looping answer whatever its confidence (`CascadeRouter._judge`).

What counts: a unit of 1..`max_unit` word/punctuation tokens repeated back to back at least
`min_repeats` times, the run covering at least `min_coverage` of the answer's tokens, and the unit
holding a word (so markdown rules, table separators or `}}}` never count). Lists, code and JSON
arrays vary from item to item (numbers, names, keys' values), so they do not form exact runs;
the thresholds were checked on the eval sets' answers (README, Evaluation, repetition check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True, slots=True)
class Repetition:
    """The loop found: the repeated text, how many times it repeats back to back, and the share of
    the answer's tokens the run covers."""

    ngram: str
    repeats: int
    coverage: float

    def as_evidence(self) -> dict[str, object]:
        return {"ngram": self.ngram[:120], "repeats": self.repeats, "coverage": round(self.coverage, 3)}


def find_repetition(
    text: str, min_repeats: int = 4, min_coverage: float = 0.3, max_unit: int = 32
) -> Repetition | None:
    """The longest-covering back-to-back repeat in `text` that passes both thresholds, else None."""
    spans = [m.span() for m in _TOKEN.finditer(text)]
    n = len(spans)
    if min_repeats < 2 or n < min_repeats:
        return None
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(text[a:b].casefold(), len(vocab)) for a, b in spans), dtype=np.int64,
                      count=n)
    wordy = np.fromiter((text[a].isalnum() or text[a] == "_" for a, _ in spans), dtype=bool, count=n)
    best: tuple[int, int, int] | None = None  # (covered tokens, start, unit)
    for unit in range(1, min(max_unit, n // min_repeats) + 1):
        same = ids[unit:] == ids[:-unit]  # same[i]: token i repeats unit tokens later
        if not same.any():
            continue
        # runs of consecutive True: a run of length L starting at i means tokens i..i+L+unit-1 are
        # one unit repeated (L + unit) / unit times
        edges = np.flatnonzero(np.diff(np.concatenate(([0], same.view(np.int8), [0]))))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            covered = int(stop - start) + unit
            if covered // unit < min_repeats or (best is not None and covered <= best[0]):
                continue
            if not wordy[start : start + unit].any():
                continue
            best = (covered, int(start), unit)
    if best is None:
        return None
    covered, start, unit = best
    coverage = covered / n
    if coverage < min_coverage:
        return None
    ngram = text[spans[start][0] : spans[start + unit - 1][1]]
    return Repetition(ngram=ngram, repeats=covered // unit, coverage=coverage)


@dataclass(frozen=True, slots=True)
class RepetitionCheck:
    """The cascade's thresholds (settings.repetition_min_repeats / repetition_min_coverage)."""

    min_repeats: int = 4  # 0: the check is off
    min_coverage: float = 0.3

    def find(self, text: str) -> Repetition | None:
        return None if self.min_repeats == 0 else find_repetition(text, self.min_repeats, self.min_coverage)
