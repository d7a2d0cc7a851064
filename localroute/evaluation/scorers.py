"""Scorers: how good is one answer. Each returns a `Score`: a value in [0, 1] (quality) and a
boolean `correct` (what AUROC, ECE and the Clopper-Pearson bound are computed on).

Answers of small models are free text, so every scorer first extracts the answer it is looking for
(the choice named, the final number, the JSON object, the `type: text` lines) and is lenient about
surrounding words, but never gives credit for an answer that names two different choices first.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from localroute.errors import ConfigError, UpstreamError
from localroute.evaluation.datasets import EvalItem


@dataclass(frozen=True, slots=True)
class Score:
    value: float
    correct: bool
    extracted: Any = None


def _norm(text: str) -> str:
    text = text.casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(string.punctuation + " '\"`")


# ---------------------------------------------------------------- choice


def extract_choice(output: str, choices: list[str]) -> str | None:
    """The choice an answer names: an exact match, else the one that starts the answer, else the one
    mentioned earliest. Letter choices (`A`, `(B)`) also match `B.`, `(B)`, `Answer: B`."""
    text = _norm(output)
    if not text:
        return None
    normed = {_norm(c): c for c in choices}
    if text in normed:
        return normed[text]
    letters = {_norm(c).strip("()"): c for c in choices if len(_norm(c).strip("()")) == 1}
    if letters:
        m = re.match(r"^(?:the )?(?:correct )?(?:answer|option)?\s*(?:is)?\s*:?\s*\(?([a-z])\)?(?:[.):,\s]|$)", text)
        if m and m.group(1) in letters:
            return letters[m.group(1)]
    # The longest choice that starts the answer (so `card_payment_fee_charged` beats `card_payment`).
    starts = [c for n, c in normed.items() if n and (text.startswith(n + " ") or text.startswith(n)
                                                     and (len(text) == len(n) or not text[len(n)].isalnum()
                                                          and text[len(n)] != "_"))]
    if starts:
        return max(starts, key=len)
    best: tuple[int, int, str] | None = None
    for n, c in normed.items():
        if len(n) < 2:
            continue
        m = re.search(r"(?<![\w])" + re.escape(n) + r"(?![\w])", text)
        if m and (best is None or (m.start(), -len(n)) < (best[0], best[1])):
            best = (m.start(), -len(n), c)
    return best[2] if best else None


def score_choice(output: str, item: EvalItem) -> Score:
    picked = extract_choice(output, item.choices or [])
    ok = picked is not None and picked == item.answer
    return Score(float(ok), ok, picked)


# ---------------------------------------------------------------- exact and numeric


def score_exact(output: str, item: EvalItem) -> Score:
    golds = item.answer if isinstance(item.answer, list) else [item.answer]
    text = _norm(output.strip().splitlines()[0] if output.strip() else "")
    ok = any(text == _norm(str(g)) for g in golds)
    return Score(float(ok), ok, text)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_number(output: str) -> float | None:
    """The final answer: the number after the last `####`, else the last number in the text."""
    tail = output.rsplit("####", 1)[1] if "####" in output else output
    found = _NUMBER.findall(tail) or _NUMBER.findall(output)
    if not found:
        return None
    raw = found[0] if "####" in output else found[-1]
    try:
        return float(raw.replace("$", "").replace(",", ""))
    except ValueError:
        return None


def score_numeric(output: str, item: EvalItem) -> Score:
    got = extract_number(output)
    try:
        gold = float(str(item.answer).replace(",", "").replace("$", ""))
    except ValueError as exc:
        raise ConfigError(f"{item.id}: numeric answer {item.answer!r} is not a number") from exc
    ok = got is not None and abs(got - gold) <= 1e-6 * max(1.0, abs(gold))
    return Score(float(ok), ok, got)


# ---------------------------------------------------------------- spans


def parse_spans(output: str) -> list[tuple[str, str]]:
    """`type: text` lines (or a JSON list of {type, text}) -> normalised (type, text) pairs."""
    text = output.strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
            return [(_norm(str(d.get("type", ""))), _norm(str(d.get("text", ""))))
                    for d in data if isinstance(d, dict)]
        except ValueError:
            pass
    pairs = []
    for line in text.splitlines():
        line = line.strip().lstrip("-*• ").strip()
        if ":" not in line:
            continue
        kind, _, value = line.partition(":")
        if _norm(value) and _norm(value) != "none":
            pairs.append((_norm(kind), _norm(value)))
    return pairs


def span_f1(predicted: list[tuple[str, str]], gold: list[tuple[str, str]]) -> float:
    """Micro F1 over (type, text) multisets; no entities predicted for none present is perfect."""
    if not predicted and not gold:
        return 1.0
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    p, r = overlap / len(predicted), overlap / len(gold)
    return 2 * p * r / (p + r)


def score_spans(output: str, item: EvalItem) -> Score:
    gold = [(_norm(s["type"]), _norm(s["text"])) for s in (item.answer or [])]
    pred = parse_spans(output)
    f1 = span_f1(pred, gold)
    return Score(f1, f1 == 1.0, pred)


# ---------------------------------------------------------------- json


def extract_json(output: str) -> Any:
    text = output.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON value in the answer")
    value, _ = json.JSONDecoder().raw_decode(text[start:])
    return value


def score_json(output: str, item: EvalItem) -> Score:
    """Valid against `schema` (and equal to `answer` when one is given)."""
    import jsonschema

    try:
        value = extract_json(output)
    except ValueError:
        return Score(0.0, False, None)
    if item.schema_ is not None:
        try:
            jsonschema.validate(value, item.schema_)
        except jsonschema.ValidationError:
            return Score(0.0, False, value)
    ok = item.answer is None or value == item.answer
    return Score(float(ok), ok, value)


# ---------------------------------------------------------------- LLM judge

JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. {reference_note}Be as objective as possible. "
    "After a short explanation, rate the response on a scale of 1 to 10 by strictly following this "
    "format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n{reference}[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def parse_rating(text: str) -> float | None:
    m = _RATING.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


class JudgeScorer:
    """MT-Bench style single-answer grading by an OpenAI-compatible model; opt-in (it costs calls).

    score = rating / 10; correct = rating >= `pass_rating`."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, pass_rating: float = 7.0,
                 timeout_s: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.pass_rating = pass_rating
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def score(self, output: str, item: EvalItem) -> Score:
        question = item.prompt if item.prompt is not None else "\n".join(
            str(m.get("content", "")) for m in item.messages or [] if m.get("role") == "user")
        ref = f"[The Start of Reference Answer]\n{item.answer}\n[The End of Reference Answer]\n\n" if item.answer else ""
        note = "Compare the response with the reference answer. " if item.answer else ""
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 512,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(
                reference_note=note, question=question, reference=ref, answer=output)}],
        }
        try:
            resp = await self._client.post("/chat/completions", json=body)
            resp.raise_for_status()
            text = resp.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise UpstreamError(f"judge call failed: {type(exc).__name__}") from exc
        rating = parse_rating(text)
        if rating is None:
            raise UpstreamError("judge answer has no [[rating]]")
        return Score(rating / 10, rating >= self.pass_rating, rating)

    async def aclose(self) -> None:
        await self._client.aclose()


LOCAL_SCORERS = {
    "choice": score_choice,
    "exact": score_exact,
    "numeric": score_numeric,
    "spans": score_spans,
    "json": score_json,
}


async def score_answer(output: str, item: EvalItem, judge: JudgeScorer | None = None) -> Score:
    """Score with the item's task; `judge` tasks need a JudgeScorer."""
    if item.task == "judge":
        if judge is None:
            raise ConfigError(f"{item.id}: task `judge` needs an LLM judge (--judge-url, --judge-model)",
                              param="judge_url")
        return await judge.score(output, item)
    return LOCAL_SCORERS[item.task](output, item)
