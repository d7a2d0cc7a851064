"""Label confidence for choice tasks: where the chosen label sits in an answer, and the candidate
continuations an engine scores there.

When the allowed answers are known (a json_schema `enum`, an eval row's `choices`, request
metadata naming them), the signal is P(chosen label | allowed labels): each label's probability as
a continuation of the context the model had when it wrote the label (prompt + the answer before it),
normalised over the labels. An engine scores the continuations (`LabelPlan`) in the request's own
KV cache; this module is engine-free (it only finds the label and builds the plan).

The label is located as `evaluation.scorers.extract_choice` reads it (an exact answer, a letter
such as `B.` / `(B)` / `Answer: B`, the longest label that starts the answer, else the earliest
mentioned); in a JSON answer, as the string value of the schema's enum field. Candidate texts keep
the surface form the model used (`Negative` -> `Positive`, `Neutral`), and a JSON value its closing
quote, so `card` and `card_arrival` stay apart.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localroute.errors import InvalidRequestError

__all__ = ["MAX_LABELS", "MAX_LABELS_CHARS", "LabelSpan", "check_labels", "enum_field", "labels_from_metadata",
           "labels_of", "locate_label", "normalise"]

METADATA_KEY = "labels"  # request metadata {"labels": "[\"a\", \"b\"]"} or "a|b|c"
# Each label is a continuation the engine scores on its own thread, every other request waiting:
# a choice task with more (or longer) labels than this is refused, not scored.
MAX_LABELS = 256
MAX_LABELS_CHARS = 8192


def check_labels(labels: Sequence[str], param: str) -> tuple[str, ...]:
    """`labels` unchanged if within MAX_LABELS labels and MAX_LABELS_CHARS characters in all, else a
    400 invalid_request_error naming `param`."""
    if len(labels) > MAX_LABELS:
        raise InvalidRequestError(f"{len(labels)} labels; at most {MAX_LABELS} are scored", param=param)
    total = sum(len(x) for x in labels)
    if total > MAX_LABELS_CHARS:
        raise InvalidRequestError(f"labels of {total} characters in all; at most {MAX_LABELS_CHARS}", param=param)
    return tuple(labels)


@dataclass(frozen=True, slots=True)
class LabelSpan:
    """The chosen label's place in the answer text: [start, end) characters, its surface form as
    written, and the text each label would have been written as there (same case, JSON quote)."""

    label: str
    start: int
    end: int
    candidates: tuple[tuple[str, str], ...]  # (label, continuation text from `start`)


def enum_field(response_format: dict[str, Any] | None) -> tuple[str, tuple[str, ...]] | None:
    """(field, labels) of the first top-level string property of a json_schema with an `enum`."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return None
    for name, sub in props.items():
        enum = sub.get("enum") if isinstance(sub, dict) else None
        if isinstance(enum, list) and len(enum) >= 2 and all(isinstance(e, str) for e in enum):
            return str(name), tuple(enum)
    return None


def labels_from_metadata(metadata: Any) -> tuple[str, ...]:
    """Labels named in a request's `metadata.labels`: a JSON array string, or `a|b|c`."""
    if not isinstance(metadata, dict):
        return ()
    raw = metadata.get(METADATA_KEY)
    if not isinstance(raw, str) or not raw.strip():
        return ()
    if len(raw) > 4 * MAX_LABELS_CHARS:  # not even worth parsing
        raise InvalidRequestError(f"metadata.labels is {len(raw)} characters; labels of at most "
                                  f"{MAX_LABELS_CHARS} characters in all are scored", param=f"metadata.{METADATA_KEY}")
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.split("|")
    if not isinstance(parsed, list):
        return ()
    labels = tuple(dict.fromkeys(str(x).strip() for x in parsed if str(x).strip()))
    return check_labels(labels, f"metadata.{METADATA_KEY}") if len(labels) >= 2 else ()


def labels_of(labels: Sequence[str], response_format: dict[str, Any] | None) -> tuple[str, ...]:
    """The allowed labels of a request: given ones, else a json_schema enum's."""
    if labels:
        return check_labels(labels, f"metadata.{METADATA_KEY}")
    found = enum_field(response_format)
    return check_labels(found[1], enum_param(found[0])) if found else ()


def enum_param(name: str) -> str:
    """The request field of a json_schema property's enum (what a 400 about it names)."""
    return f"response_format.json_schema.schema.properties.{name}.enum"


def _norm(text: str) -> str:
    return text.casefold()


def _styled(surface: str, label: str, other: str) -> str:
    """`other` written the way the model wrote `label` (as `surface`)."""
    if surface == label:
        return other
    if surface == label.upper():
        return other.upper()
    if surface == label.lower():
        return other.lower()
    if surface == label.capitalize():
        return other.capitalize()
    return other


def _letter(label: str) -> str | None:
    core = label.strip().strip("()")
    return core if len(core) == 1 and core.isalpha() else None


def _find_text(text: str, labels: Sequence[str]) -> tuple[str, int, int] | None:
    """(label, start, end) of the label a free-text answer names (extract_choice's order)."""
    lead = len(text) - len(text.lstrip(" \t\n\"'`*"))
    body = text[lead:]
    folded = _norm(body)
    letters = {_letter(lab).casefold(): lab for lab in labels if _letter(lab)}  # type: ignore[union-attr]
    if letters and len(letters) == len(labels):
        m = re.match(r"(?:the )?(?:correct )?(?:answer|option)?\s*(?:is)?\s*:?\s*(\(?)([a-z])\)?(?:[.):,\s]|$)", folded)
        if m and m.group(2) in letters:
            lab = letters[m.group(2)]
            if lab.startswith("(") and m.group(1):  # the model wrote the parenthesised form
                start = lead + m.start(1)
                return lab, start, start + len(lab)
            return lab, lead + m.start(2), lead + m.end(2)
    starts = [lab for lab in labels
              if folded.startswith(_norm(lab)) and (len(folded) == len(lab) or not (folded[len(lab)].isalnum()
                                                                                  or folded[len(lab)] == "_"))]
    if starts:
        lab = max(starts, key=len)
        return lab, lead, lead + len(lab)
    best: tuple[int, int, str] | None = None
    for lab in labels:
        if len(lab) < 2:
            continue
        m = re.search(r"(?<![\w])" + re.escape(_norm(lab)) + r"(?![\w])", folded)
        if m and (best is None or (m.start(), -len(lab)) < (best[0], best[1])):
            best = (m.start(), -len(lab), lab)
    if best is None:
        return None
    return best[2], lead + best[0], lead + best[0] + len(best[2])


def locate_label(text: str, labels: Sequence[str], response_format: dict[str, Any] | None = None) -> LabelSpan | None:
    """Where the answer names one of `labels`, and each label's continuation there; None: it names none."""
    if not labels:
        return None
    field = enum_field(response_format)
    if field is not None and set(field[1]) >= set(labels):
        m = re.search(r'"' + re.escape(field[0]) + r'"\s*:\s*"', text)
        if m is None:
            return None
        end_quote = text.find('"', m.end())
        value = text[m.end(): end_quote if end_quote >= 0 else len(text)]
        if value not in labels:
            return None
        return LabelSpan(value, m.end(), m.end() + len(value), tuple((lab, lab + '"') for lab in labels))
    found = _find_text(text, labels)
    if found is None:
        return None
    label, start, end = found
    surface = text[start:end]
    return LabelSpan(label, start, end, tuple((lab, _styled(surface, label, lab)) for lab in labels))


def normalise(logprobs: dict[str, float], chosen: str) -> float:
    """log P(chosen) renormalised over the labels (log-sum-exp); -inf for a label not scored."""
    finite = [v for v in logprobs.values() if v > -math.inf]
    if chosen not in logprobs or not finite or logprobs[chosen] == -math.inf:
        return -math.inf
    top = max(finite)
    lse = top + math.log(sum(math.exp(v - top) for v in finite))
    return min(0.0, logprobs[chosen] - lse)


@dataclass(frozen=True, slots=True)
class LabelPlan:
    """What an engine feeds to score every candidate in one KV cache. `root` is the context's last
    two tokens, fed again from position `base` (their logits start every candidate), `paths` each
    candidate's token ids. Candidates are visited in sorted token order, so a prefix shared by
    several labels is decoded once and stays in the cache while the labels under it are scored.

    No step feeds a single token: llama.cpp's one-token path gives logits up to 0.12 nats away from
    the same token fed with others (LlamaEngine._prefill), while chunks of two or more give the
    same numbers bit for bit wherever they start. So a label scores exactly what a full prefill of
    context + label gives, whichever other labels share its prefix."""

    base: int
    root: tuple[int, ...]
    paths: tuple[tuple[str, tuple[int, ...]], ...]

    def feeds(self) -> list[tuple[int, tuple[int, ...]]]:
        """(keep, need) steps: cut the cache back to `base + keep` positions, then feed
        `need[keep:]` (two tokens at least) there, all with logits; row j is then the distribution
        after `need[:keep + j + 1]`. `need` starts with `root`."""
        out: list[tuple[int, tuple[int, ...]]] = []
        stack: tuple[int, ...] = ()
        for _, path in sorted(self.paths, key=lambda p: p[1]):
            need = (*self.root, *path[:-1])  # the last label token needs no row of its own
            common = 0
            while common < min(len(stack), len(need)) and stack[common] == need[common]:
                common += 1
            if common == len(need):
                continue
            keep = max(0, min(common, len(need) - 2))
            out.append((keep, need))
            stack = need
        return out
