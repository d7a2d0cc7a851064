"""The generic evaluation JSONL format and adapters from the staged public data sets.

One object per line:

    {"id": "banking77-17", "messages": [{"role": "user", "content": "..."}],   # or "prompt": "..."
     "task": "choice", "choices": ["card_arrival", ...], "answer": "card_arrival",
     "outcomes": {"gpt-4-1106-preview": {"correct": true}}}                      # optional

`task` picks the scorer (see scorers.py). `outcomes` are recorded results of other models on the
same query: `{"correct": bool}` or `{"score": float in [0, 1]}`; `--frontier recorded:<model>` uses
them. Optional keys: `schema` (task json), `max_tokens`, `stop`, `system` (a system prompt sent
first; `data convert` gives the choice sets LABEL_FIRST), `meta` (free-form, e.g. subject).

Adapters read the folder layout documented in the data README (default ../shared/data) and never
copy the data into the repository; `--limit` takes a seeded random sample, kept in file order,
because several files are sorted by label (banking77's first rows are all one intent).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from localroute.errors import ConfigError

Task = Literal["choice", "exact", "numeric", "spans", "json", "judge"]
TASKS: tuple[str, ...] = ("choice", "exact", "numeric", "spans", "json", "judge")


class Outcome(BaseModel):
    """A recorded result of another model on the item: correct/incorrect, or a score in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    correct: bool | None = None
    score: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of(self) -> Outcome:
        if self.correct is None and self.score is None:
            raise ValueError("an outcome needs `correct` or `score`")
        return self

    @property
    def value(self) -> float:
        return float(bool(self.correct)) if self.score is None else float(self.score)


class EvalItem(BaseModel):
    """One evaluation query with its gold answer."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    task: Task
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    choices: list[str] | None = None
    answer: Any = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    outcomes: dict[str, Outcome] = Field(default_factory=dict)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None
    # a system prompt sent first (merged into the row's own system message): `data convert` gives the
    # choice sets LABEL_FIRST, so the label is the answer's first token and the signal reads it
    system: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> EvalItem:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        if self.task == "choice" and not self.choices:
            raise ValueError("task `choice` needs `choices`")
        if self.task == "choice" and self.answer not in (self.choices or []):
            raise ValueError("`answer` must be one of `choices`")
        if self.task == "json" and self.schema_ is None and self.answer is None:
            raise ValueError("task `json` needs `schema` or `answer`")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True,
                                          exclude_defaults=True) | {"id": self.id, "task": self.task},
                          ensure_ascii=False)


def load_items(path: Path) -> list[EvalItem]:
    """Read and validate a dataset file; a bad line raises ConfigError naming it."""
    items: list[EvalItem] = []
    seen: set[str] = set()
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc}", param="dataset") from exc
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = EvalItem.model_validate(json.loads(line))
            except (ValueError, ValidationError) as exc:
                raise ConfigError(f"{path}:{lineno}: invalid item: {_first_error(exc)}", param="dataset") from None
            if item.id in seen:
                raise ConfigError(f"{path}:{lineno}: duplicate id {item.id!r}", param="dataset")
            seen.add(item.id)
            items.append(item)
    return items


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e.get("loc", ()))
        return f"{loc}: {e['msg']}" if loc else str(e["msg"])
    return str(exc)


def sample(items: list[EvalItem], limit: int | None, seed: int) -> list[EvalItem]:
    """A seeded random subset of `limit` items, in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [it for i, it in enumerate(items) if i in keep]


def write_items(items: Iterable[EvalItem], out: Path) -> int:
    """Write atomically-enough for a converter: to a temporary name, then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(item.to_json() + "\n")
            n += 1
    tmp.replace(out)
    return n


# ---------------------------------------------------------------- adapters

LABEL_FIRST = ("Reply with the answer alone, written exactly as one of the options the user gives, "
               "on the first line. No explanation, no other words.")

def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def banking77(data: Path) -> Iterator[EvalItem]:
    """Intent classification over 77 labels, with six fixed chat examples from train.csv so that a
    small model answers with a label rather than with advice."""
    folder = data / "banking77"
    labels: list[str] = json.loads((folder / "categories.json").read_text())
    system = ("You classify bank customer messages. Reply with exactly one intent name from this list, "
              "nothing else:\n" + ", ".join(labels))
    shots: list[dict[str, Any]] = []
    seen: set[str] = set()
    with (folder / "train.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] not in seen and len(seen) < 6 and len(row["text"]) < 80:
                seen.add(row["category"])
                shots += [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": row["category"]}]
    with (folder / "test.csv").open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            messages = [{"role": "system", "content": system}, *shots, {"role": "user", "content": row["text"]}]
            yield EvalItem(id=f"banking77-{i}", task="choice", messages=messages, choices=labels,
                           answer=row["category"], stop=["\n"], system=LABEL_FIRST)


def _tweeteval(data: Path, name: str, question: str) -> Iterator[EvalItem]:
    folder = data / "tweeteval" / name
    mapping = dict(line.split("\t") for line in (folder / "mapping.txt").read_text().splitlines() if line)
    labels = [mapping[k] for k in sorted(mapping, key=int)]
    texts = (folder / "test_text.txt").read_text(encoding="utf-8").splitlines()
    golds = (folder / "test_labels.txt").read_text().split()
    if len(texts) != len(golds):
        raise ConfigError(f"tweeteval/{name}: {len(texts)} texts but {len(golds)} labels")
    for i, (text, gold) in enumerate(zip(texts, golds)):
        prompt = f"{question} Answer with one word: {', '.join(labels)}.\n\nTweet: {text.strip()}"
        yield EvalItem(id=f"tweeteval-{name}-{i}", task="choice", messages=_user(prompt), choices=labels,
                       answer=mapping[gold.strip()], stop=["\n"], system=LABEL_FIRST)


def tweeteval_sentiment(data: Path) -> Iterator[EvalItem]:
    return _tweeteval(data, "sentiment", "What is the sentiment of this tweet?")


def tweeteval_emotion(data: Path) -> Iterator[EvalItem]:
    return _tweeteval(data, "emotion", "Which emotion does this tweet express?")


def _bool_outcomes(row: dict[str, str], models: Iterable[str]) -> dict[str, Outcome]:
    out = {}
    for m in models:
        v = row.get(m, "").strip()
        if v in ("True", "False"):
            out[m] = Outcome(correct=v == "True")
    return out


ROUTELLM_MODELS = ("mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")


def mmlu(data: Path) -> Iterator[EvalItem]:
    """MMLU test rows joined row by row with RouteLLM's recorded Mixtral / GPT-4 outcomes."""
    responses = data / "routellm" / "mmlu" / "responses"
    for test in sorted((data / "mmlu" / "test").glob("*_test.csv")):
        subject = test.name.removesuffix("_test.csv")
        rec_path = responses / f"mmlu_{subject}.csv"
        if not rec_path.is_file():
            continue
        with test.open(newline="", encoding="utf-8") as fh:
            gold_rows = list(csv.reader(fh))
        with rec_path.open(newline="", encoding="utf-8") as fh:
            rec_rows = list(csv.DictReader(fh))
        if len(gold_rows) != len(rec_rows):
            raise ConfigError(f"mmlu/{subject}: {len(gold_rows)} gold rows but {len(rec_rows)} recorded rows")
        topic = subject.replace("_", " ")
        for i, (row, rec) in enumerate(zip(gold_rows, rec_rows)):
            question, *options, letter = row
            body = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", options))
            text = (f"The following is a multiple choice question about {topic}. "
                    f"Answer with the letter (A, B, C or D) only.\n\n{question}\n{body}\nAnswer:")
            yield EvalItem(id=f"mmlu-{subject}-{i}", task="choice", messages=_user(text),
                           choices=["A", "B", "C", "D"], answer=letter.strip(),
                           outcomes=_bool_outcomes(rec, ROUTELLM_MODELS), stop=["\n"],
                           meta={"subject": subject}, system=LABEL_FIRST)


def gsm8k(data: Path) -> Iterator[EvalItem]:
    """GSM8K test joined row by row with RouteLLM's recorded outcomes (same row order)."""
    with (data / "routellm" / "gsm8k" / "gsm8k_responses.csv").open(newline="", encoding="utf-8") as fh:
        recorded = list(csv.DictReader(fh))
    lines = (data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    if len(lines) != len(recorded):
        raise ConfigError(f"gsm8k: {len(lines)} questions but {len(recorded)} recorded rows")
    for i, (line, rec) in enumerate(zip(lines, recorded)):
        row = json.loads(line)
        final = row["answer"].rsplit("####", 1)[-1].strip()
        text = (f"{row['question']}\n\nSolve the problem step by step, then give the final answer "
                f"on its own line as '#### <number>'.")
        yield EvalItem(id=f"gsm8k-{i}", task="numeric", messages=_user(text), answer=final,
                       outcomes=_bool_outcomes(rec, ROUTELLM_MODELS), max_tokens=256)


_LETTER = re.compile(r"^\([A-Z]\)$")
_OPTION = re.compile(r"^\(([A-Z])\)", re.MULTILINE)
_BINARY = ({"Yes", "No"}, {"True", "False"}, {"valid", "invalid"})


def bbh(data: Path) -> Iterator[EvalItem]:
    """All BIG-Bench Hard tasks, zero-shot, answer only (no chain of thought)."""
    for path in sorted((data / "bbh").glob("*.json")):
        name = path.stem
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        for i, ex in enumerate(examples):
            target: str = ex["target"].strip()
            base = f"{ex['input']}\n\nGive only the final answer."
            common: dict[str, Any] = {"id": f"bbh-{name}-{i}", "meta": {"subtask": name}}
            if _LETTER.match(target):
                letters = [f"({c})" for c in _OPTION.findall(ex["input"])] or [target]
                if target not in letters:
                    letters.append(target)
                yield EvalItem(task="choice", messages=_user(base + " Answer with the option letter, e.g. (A)."),
                               choices=letters, answer=target, stop=["\n"], system=LABEL_FIRST, **common)
            elif (pair := next((s for s in _BINARY if target in s), None)) is not None:
                choices = sorted(pair)
                yield EvalItem(task="choice", messages=_user(base + f" Answer {' or '.join(choices)}."),
                               choices=choices, answer=target, stop=["\n"], system=LABEL_FIRST, **common)
            elif re.fullmatch(r"-?\d+", target):
                yield EvalItem(task="numeric", messages=_user(base), answer=target, max_tokens=32, **common)
            else:
                yield EvalItem(task="exact", messages=_user(base), answer=target, max_tokens=96, **common)


_SPAN_FORMAT = "Answer with one entity per line as `type: text`, or `none` if there is none."


def conll2003(data: Path) -> Iterator[EvalItem]:
    """CoNLL-2003 NER test sentences; gold spans from the BIO tags."""
    sentences: list[list[tuple[str, str]]] = [[]]
    for line in (data / "conll2003_crossner" / "test.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if sentences[-1]:
                sentences.append([])
            continue
        token, tag = line.split("\t")
        sentences[-1].append((token, tag))
    for i, sent in enumerate(s for s in sentences if s):
        spans: list[dict[str, str]] = []
        for token, tag in sent:
            if tag.startswith("B-") or (tag.startswith("I-") and (not spans or spans[-1]["type"] != tag[2:])):
                spans.append({"type": tag[2:], "text": token})
            elif tag.startswith("I-"):
                spans[-1]["text"] += " " + token
        text = " ".join(t for t, _ in sent)
        prompt = (f"Extract the named entities (person, location, organisation, misc) from the sentence. "
                  f"{_SPAN_FORMAT}\n\nSentence: {text}")
        yield EvalItem(id=f"conll2003-{i}", task="spans", messages=_user(prompt), answer=spans, max_tokens=96)


def restaurant8k(data: Path) -> Iterator[EvalItem]:
    """Restaurant-8k slot spans (people, time, date, first_name, last_name)."""
    rows = json.loads((data / "restaurant8k" / "test.json").read_text(encoding="utf-8"))
    for i, row in enumerate(rows):
        text = row["userInput"]["text"]
        spans = []
        for label in row.get("labels", []):
            span = label["valueSpan"]
            spans.append({"type": label["slot"], "text": text[span.get("startIndex", 0): span["endIndex"]]})
        requested = (row.get("context") or {}).get("requestedSlots") or []
        asked = f"The assistant had asked for: {', '.join(requested)}.\n" if requested else ""
        prompt = (f"A user is booking a restaurant table. {asked}Extract the slots (people, time, date, "
                  f"first_name, last_name) from the user's message. {_SPAN_FORMAT}\n\nMessage: {text}")
        yield EvalItem(id=f"restaurant8k-{i}", task="spans", messages=_user(prompt), answer=spans, max_tokens=64)


def mt_bench(data: Path) -> Iterator[EvalItem]:
    """MT-Bench first turns, with RouteLLM's GPT-4 judge scores (1-10, stored as score/10)."""
    refs: dict[int, str] = {}
    for line in (data / "mt_bench" / "reference_answer" / "gpt-4.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        refs[r["question_id"]] = r["choices"][0]["turns"][0]
    scores: dict[int, dict[str, Outcome]] = {}
    for line in (data / "routellm" / "mt_bench" / "judgements.jsonl").read_text(encoding="utf-8").splitlines():
        j = json.loads(line)
        if j["turn"] == 1 and isinstance(j.get("score"), (int, float)) and j["score"] >= 1:
            scores.setdefault(j["question_id"], {})[j["model"]] = Outcome(score=min(j["score"], 10) / 10)
    for line in (data / "mt_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        qid = q["question_id"]
        yield EvalItem(id=f"mt_bench-{qid}", task="judge", messages=_user(q["turns"][0]), answer=refs.get(qid),
                       outcomes=scores.get(qid, {}), max_tokens=512, meta={"category": q["category"]})


ADAPTERS: dict[str, Callable[[Path], Iterator[EvalItem]]] = {
    "banking77": banking77,
    "tweeteval-sentiment": tweeteval_sentiment,
    "tweeteval-emotion": tweeteval_emotion,
    "mmlu": mmlu,
    "gsm8k": gsm8k,
    "bbh": bbh,
    "conll2003": conll2003,
    "restaurant8k": restaurant8k,
    "mt_bench": mt_bench,
}


def convert(name: str, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Build the named data set in the generic format from the staged files."""
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise ConfigError(f"unknown data set {name!r}; one of {', '.join(ADAPTERS)}", param="name")
    if not data_dir.is_dir():
        raise ConfigError(f"data folder not found: {data_dir} (set --data-dir or LOCALROUTE_EVAL_DATA_DIR)",
                          param="data_dir")
    try:
        items = list(adapter(data_dir))
    except FileNotFoundError as exc:
        raise ConfigError(f"{name}: missing file {exc.filename}", param="data_dir") from None
    return sample(items, limit, seed)
