"""Batched label scoring (backends/label_scoring.py) with the real SmolLM2 model: the same numbers
as the sequential method (the reference: one llama_decode per LabelPlan feed in the slot's own
stream), the slot's KV cache untouched, alongside other requests, in waves, and the fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from localroute.backends.label_scoring import LabelScorer
from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.types import Generation, GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

# banking77 intents: multi-token labels, many sharing prefixes (card_, top_up_, transfer_, ...)
LABELS = ("card_arrival", "card_linking", "card_not_working", "card_payment_fee_charged",
          "card_payment_not_recognised", "card_payment_wrong_exchange_rate", "card_swallowed",
          "cash_withdrawal_charge", "cash_withdrawal_not_recognised", "lost_or_stolen_card",
          "top_up_by_bank_transfer_charge", "top_up_by_card_charge", "top_up_failed", "top_up_limits",
          "top_up_reverted", "transfer_fee_charged", "transfer_not_received_by_recipient",
          "transfer_timing", "exchange_rate", "age_limit")
LABEL_FIRST = "Reply with the answer alone, written exactly as one of the options the user gives. No explanation."


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> Iterator[LlamaCppBackend]:
    engine = LlamaEngine(smollm2_path, n_ctx_seq=1024, n_parallel=4, n_threads=2)
    engine._labels.batched = True  # the default is the sequential method (README: it is faster on 2 cores)
    yield LlamaCppBackend("smollm2-135m", engine)
    engine.close()


def _choice(text: str, labels: tuple[str, ...] = LABELS) -> GenerationRequest:
    messages = ({"role": "system", "content": LABEL_FIRST},
                {"role": "user", "content": f"Classify this bank customer message: {text} Options: {', '.join(labels)}."})
    return GenerationRequest(messages=messages, params=SamplingParams(max_tokens=24, temperature=0, top_logprobs=3),
                             labels=labels)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _with(scorer: LabelScorer, **attrs: Any) -> Any:
    """Set scorer attributes for one block, the scoring context rebuilt around it."""
    class _Ctx:
        def __enter__(self) -> None:
            self.old = {k: getattr(scorer, k) for k in attrs}
            scorer.close()
            for k, v in attrs.items():
                setattr(scorer, k, v)

        def __exit__(self, *exc: object) -> None:
            scorer.close()
            for k, v in self.old.items():
                setattr(scorer, k, v)
    return _Ctx()


def _tokens(gen: Generation) -> list[tuple[int, float, tuple[float, ...]]]:
    return [(t.token_id, t.logprob, tuple(a.logprob for a in t.top_logprobs)) for t in gen.tokens]


MESSAGES = ("my new card has not arrived yet.", "I was charged twice for a top up by card.")


@pytest.mark.parametrize("text", MESSAGES)
def test_batched_scores_equal_the_sequential_method(backend: LlamaCppBackend, text: str) -> None:
    """Every label's raw logprob is the sequential method's within 1e-4, in far fewer llama_decode
    calls; the chosen label's normalised score likewise."""
    scorer = backend.engine._labels
    request = _choice(text)
    with _with(scorer, batched=False):
        ref = _run(backend.generate(request))
    new = _run(backend.generate(request))
    a, b = ref.extra["label"], new.extra["label"]
    assert a["chosen"] in LABELS and a["method"] == "sequential" and "fallback" not in a, ref.text
    assert b["method"] == "batched" and b["chosen"] == a["chosen"], b
    assert set(b["raw"]) == set(LABELS)
    for label in LABELS:
        assert abs(a["raw"][label] - b["raw"][label]) < 1e-4, (label, a["raw"][label], b["raw"][label])
    assert abs(a["logprob"] - b["logprob"]) < 1e-4
    assert b["decode_calls"] * 3 <= a["decode_calls"], (a["decode_calls"], b["decode_calls"])
    assert _tokens(ref) == _tokens(new)  # the answer itself never depends on the scoring


def test_the_slot_and_the_next_request_are_untouched(backend: LlamaCppBackend) -> None:
    """Batched scoring reads the slot's KV and writes only its own context: the next request on the
    same slot (a prefix-cache hit) gives bit-identical tokens and logprobs, the slot's cached prompt
    is the whole prompt, and the engine's own decode counter does not move while scoring."""
    engine = backend.engine
    request = _choice("my new card has not arrived yet.")
    plain = GenerationRequest(messages=request.messages, params=request.params)
    before = _run(backend.generate(plain))
    first = _run(backend.generate(request))
    assert first.extra["label"]["method"] == "batched"
    for _ in range(100):  # the answer reaches the caller before the step's end releases its slot
        if engine.load()["active"] == 0:
            break
        time.sleep(0.05)
    prompt = backend.prompt_tokens(request)
    assert any(len(c) == len(prompt) and list(c) == prompt for c in engine._slot_cache)
    s0 = engine.stats["decode_steps_total"]
    after = _run(backend.generate(plain))
    s1 = engine.stats["decode_steps_total"]
    assert engine.stats["prompt_tokens_cached_total"] > 0
    assert _tokens(before) == _tokens(after) == _tokens(first)
    again = _run(backend.generate(request))
    s2 = engine.stats["decode_steps_total"]
    assert _tokens(again) == _tokens(first)
    assert again.extra["label"] == {**first.extra["label"], "cost_s": again.extra["label"]["cost_s"]}
    assert s2 - s1 == s1 - s0  # scoring adds no llama_decode on the engine's own context


def test_scoring_beside_running_requests(backend: LlamaCppBackend) -> None:
    """Label requests scored while others decode in the same batch get the numbers they get alone,
    and the others' tokens and logprobs are unchanged."""
    labelled = [_choice(t) for t in MESSAGES]
    others = [GenerationRequest(messages=({"role": "user", "content": f"Write a short poem about {w}."},),
                                params=SamplingParams(max_tokens=40, temperature=0, top_logprobs=2))
              for w in ("rain", "bread")]
    alone = [_run(backend.generate(r)) for r in labelled + others]

    async def together() -> list[Generation]:
        return list(await asyncio.gather(*(backend.generate(r) for r in others + labelled)))

    mixed = _run(together())
    mixed = mixed[len(others):] + mixed[:len(others)]
    for a, b in zip(alone, mixed):
        assert _tokens(a) == _tokens(b)
        if "label" in a.extra:
            assert b.extra["label"]["method"] == "batched"
            assert {k: v for k, v in a.extra["label"].items() if k != "cost_s"} == \
                   {k: v for k, v in b.extra["label"].items() if k != "cost_s"}


def test_waves_when_labels_outnumber_the_scoring_streams(backend: LlamaCppBackend) -> None:
    """More branches than scoring streams: several waves, the same numbers."""
    request = _choice("I was charged twice for a top up by card.")
    full = _run(backend.generate(request)).extra["label"]
    with _with(backend.engine._labels, max_seqs=3):
        waves = _run(backend.generate(request)).extra["label"]
    assert waves["method"] == "batched" and waves["decode_calls"] > full["decode_calls"]
    assert waves["raw"] == full["raw"]


def test_falls_back_to_the_sequential_method_and_says_why(backend: LlamaCppBackend) -> None:
    """No scoring context (it could not be built): the labels are scored one feed at a time in the
    slot, and the label info says so."""
    request = _choice("my new card has not arrived yet.")
    batched = _run(backend.generate(request)).extra["label"]
    with _with(backend.engine._labels, _broken="the scoring context could not be created"):
        info = _run(backend.generate(request)).extra["label"]
    assert info["method"] == "sequential" and info["fallback"] == "the scoring context could not be created"
    assert all(abs(info["raw"][k] - v) < 1e-4 for k, v in batched["raw"].items())


def test_a_long_answer_after_the_label_is_still_scored_batched(backend: LlamaCppBackend) -> None:
    """The slot's stream holds the whole answer, here 260 tokens past the label: more cells than
    the context to score needs. The scoring context takes the stream whole (it cannot load a
    stream it has no room for): batched, no fallback, the sequential numbers."""
    request = _choice("my new card has not arrived yet.")
    request = replace(request, params=replace(request.params, max_tokens=260, ignore_eos=True))
    scorer = backend.engine._labels
    with _with(scorer, batched=False):
        ref = _run(backend.generate(request)).extra["label"]
    assert ref["chosen"] is not None and ref["method"] == "sequential", ref
    with _with(scorer):  # a fresh scoring context, sized for this request
        new = _run(backend.generate(request)).extra["label"]
    assert new["method"] == "batched" and "fallback" not in new, new
    assert new["chosen"] == ref["chosen"]
    assert all(abs(ref["raw"][k] - v) < 1e-4 for k, v in new["raw"].items())


def test_a_unified_kv_cache_is_scored_sequentially_on_every_slot(smollm2_path: Path) -> None:
    """kv_unified: one KV stream holds every slot. llama.cpp cannot load a slot > 0's state into a
    stream of its own (slot 0's it can), so batched scoring is refused up front, the same on every
    slot: requests on slot 0 and slot 1 at once are scored sequentially and the label info says why."""
    engine = LlamaEngine(smollm2_path, n_ctx_seq=512, n_parallel=2, n_threads=2, kv_unified=True)
    engine._labels.batched = True
    backend = LlamaCppBackend("smollm2-135m", engine)
    labels = LABELS[:6]

    async def together() -> list[Generation]:
        return list(await asyncio.gather(*(backend.generate(_choice(t, labels)) for t in MESSAGES)))

    try:
        infos = [g.extra["label"] for g in _run(together())]
        assert engine._labels._ctx is None  # no scoring context was built
    finally:
        engine.close()
    for info in infos:
        assert info["chosen"] in labels and info["logprob"] is not None, info
        assert info["method"] == "sequential" and "kv_unified" in info["fallback"], info


def test_the_default_path_builds_no_scoring_context_and_reads_no_state(backend: LlamaCppBackend,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential by default: no scoring context (no memory), the slot's saved state never read or
    rewritten, no fallback reported."""
    from localroute.backends import label_scoring

    def refuse(*args: object) -> None:
        raise AssertionError("the default path touched the saved state")

    monkeypatch.setattr(label_scoring, "_restream", refuse)
    monkeypatch.setattr(LabelScorer, "_load", refuse)
    scorer = backend.engine._labels
    assert LabelScorer(backend.engine).batched is False
    with _with(scorer, batched=False):
        info = _run(backend.generate(_choice("my new card has not arrived yet."))).extra["label"]
        assert scorer._ctx is None
    assert info["method"] == "sequential" and "fallback" not in info and info["logprob"] is not None, info
