"""The llama.cpp tier with the real SmolLM2 model: generation, logprob correctness, stops, seeds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.errors import ContextLengthExceededError
from localroute.types import GenerationRequest, SamplingParams
from tests.conftest import local_settings, safe_extra_buffer_modes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> Iterator[LlamaCppBackend]:
    engine = LlamaEngine(smollm2_path, n_ctx_seq=512, n_parallel=4, n_threads=2)
    yield LlamaCppBackend("smollm2-135m", engine)
    engine.close()


def chat(text: str, **params: object) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=SamplingParams(**params))  # type: ignore[arg-type]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_chat_template_comes_from_gguf(backend: LlamaCppBackend) -> None:
    ids = backend.prompt_tokens(chat("Hello"))
    rendered = b"".join(backend.engine.piece(i, special=True) for i in ids).decode()
    assert "<|im_start|>user\nHello<|im_end|>" in rendered  # SmolLM2's ChatML
    assert rendered.endswith("<|im_start|>assistant\n")


def test_logprobs_match_reference_computation(backend: LlamaCppBackend, smollm2_path: Path) -> None:
    """Each token's logprob equals a float64 log-softmax of llama-cpp-python's own logits for the
    same tokens (reference: high-level Llama with logits_all, fed the same tokens, loaded with the
    engine's extra-buffer choice: llama-cpp-python's own default crashes on AMX CPUs)."""
    from localroute.backends.cpu_features import llama_class

    Llama = llama_class(backend.engine.extra_buffers.use_extra_bufts)
    request = chat("Name three colours.", max_tokens=16, temperature=0, top_logprobs=3)
    gen = run(backend.generate(request))
    assert gen.tokens, "no tokens generated"
    ref = Llama(str(smollm2_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    ref.eval(backend.prompt_tokens(request))
    for tok in gen.tokens:
        row = np.asarray(ref.scores[ref.n_tokens - 1], dtype=np.float64)
        logsoftmax = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
        assert abs(logsoftmax[tok.token_id] - tok.logprob) < 1e-3
        assert int(logsoftmax.argmax()) == tok.token_id  # greedy picks the argmax
        top_ids = np.argsort(-logsoftmax)[:3]
        assert [round(a.logprob, 3) for a in tok.top_logprobs] == [round(float(logsoftmax[i]), 3) for i in top_ids]
        ref.eval([tok.token_id])


def test_top_logprobs_sorted_and_contain_greedy_choice(backend: LlamaCppBackend) -> None:
    gen = run(backend.generate(chat("Say yes.", max_tokens=6, temperature=0, top_logprobs=5)))
    assert gen.tokens and len(gen.tokens) == gen.completion_tokens, gen  # an empty answer proves nothing
    for tok in gen.tokens:
        lps = [a.logprob for a in tok.top_logprobs]
        assert len(lps) == 5 and lps == sorted(lps, reverse=True)
        assert tok.top_logprobs[0].token == tok.token and tok.logprob <= 0


def test_max_tokens_gives_length(backend: LlamaCppBackend) -> None:
    gen = run(backend.generate(GenerationRequest(prompt="One, two, three,", params=SamplingParams(max_tokens=5, temperature=0))))
    assert gen.finish_reason == "length" and gen.completion_tokens == 5 and len(gen.tokens) == 5


def test_stop_sequence_cuts_text_and_tokens(backend: LlamaCppBackend) -> None:
    full = run(backend.generate(GenerationRequest(prompt="1, 2, 3, 4, 5,", params=SamplingParams(max_tokens=12, temperature=0))))
    assert "7" in full.text, full.text
    gen = run(backend.generate(GenerationRequest(prompt="1, 2, 3, 4, 5,", params=SamplingParams(max_tokens=12, temperature=0, stop=("7",)))))
    assert gen.finish_reason == "stop"
    assert gen.text == full.text[: full.text.index("7")]
    assert "".join(t.token for t in gen.tokens) == gen.text


def test_stream_text_equals_generate_and_holds_back_stop(backend: LlamaCppBackend) -> None:
    req = GenerationRequest(prompt="1, 2, 3, 4, 5,", params=SamplingParams(max_tokens=12, temperature=0, stop=("7,",)))

    async def collect() -> tuple[str, str]:
        parts, final = [], None
        async for d in backend.stream(req):
            parts.append(d.text)
            final = d.final or final
        assert final is not None
        return "".join(parts), final.text

    streamed, final_text = run(collect())
    assert streamed == final_text and "7" not in streamed


def test_greedy_requests_never_build_a_sampler(backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seedless RNG reads OS entropy; greedy decoding needs none, so none is made (a sampled
    request gets one)."""
    from localroute.backends import decoding

    made: list[object] = []
    real = decoding.np.random.default_rng
    monkeypatch.setattr(decoding.np.random, "default_rng", lambda seed=None: made.append(seed) or real(seed))
    asyncio.run(backend.generate(chat("Say hi.", max_tokens=4, temperature=0.0)))
    assert made == []
    asyncio.run(backend.generate(chat("Say hi.", max_tokens=4, temperature=0.8, seed=11)))
    assert made == [11]


def test_seed_makes_sampling_reproducible(backend: LlamaCppBackend) -> None:
    def sample(seed: int) -> str:
        req = chat("Write a word.", max_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
        return run(backend.generate(req)).text

    a, b = sample(7), sample(7)
    assert a == b
    others = {sample(s) for s in range(8, 12)}
    assert len(others | {a}) > 1  # different seeds explore different answers


def test_prompt_beyond_context_is_rejected(backend: LlamaCppBackend) -> None:
    with pytest.raises(ContextLengthExceededError):
        run(backend.generate(chat("word " * 600, max_tokens=4)))


def test_unified_kv_cache_keeps_tokens_and_logprobs_close(smollm2_path: Path) -> None:
    """kv_unified trades bit-exactness for batched speed: same greedy tokens, logprobs close (measured
    max 0.12 nats here; cross-sequence contamination would show as different tokens or far larger gaps)."""
    engine = LlamaEngine(smollm2_path, n_ctx_seq=256, n_parallel=4, n_threads=2, kv_unified=True)
    try:
        backend = LlamaCppBackend("unified", engine)
        request = chat("Name three colours.", max_tokens=12, temperature=0)
        alone = run(backend.generate(request))

        async def four() -> list:  # type: ignore[type-arg]
            return list(await asyncio.gather(*(backend.generate(request) for _ in range(4))))

        for gen in run(four()):
            assert [t.token_id for t in gen.tokens] == [t.token_id for t in alone.tokens]
            assert max(abs(a.logprob - b.logprob) for a, b in zip(gen.tokens, alone.tokens)) < 0.25
    finally:
        engine.close()


@pytest.mark.parametrize("mode", safe_extra_buffer_modes())
def test_engine_answers_through_each_extra_buffer_mode(mode: str) -> None:
    """settings.llama_extra_buffers reaches the engine's llama_model_params through from_settings,
    and the real model answers with it; `on` is not run where AMX makes it the known crash."""
    from localroute.backends.cpu_features import extra_buffers_choice
    from localroute.backends.llama_cpp import from_settings

    settings = local_settings(llama_extra_buffers=mode, n_ctx=256, n_parallel=1)
    backend = from_settings(settings.ladder()[0], settings)
    try:
        assert backend.engine.extra_buffers == extra_buffers_choice(mode)
        gen = run(backend.generate(chat("What is the capital of France?", max_tokens=8, temperature=0)))
        assert gen.text.strip() and gen.completion_tokens > 0 and all(t.logprob <= 0 for t in gen.tokens)
    finally:
        backend.engine.close()


def test_logit_bias_of_minus_100_on_the_greedy_token_changes_the_first_token(backend: LlamaCppBackend) -> None:
    """OpenAI semantics, applied before the greedy argmax; the logprobs reported stay the model's own."""
    plain = run(backend.generate(chat("What is the capital of France?", max_tokens=4, temperature=0, top_logprobs=5)))
    first = plain.tokens[0]
    biased = run(backend.generate(chat("What is the capital of France?", max_tokens=4, temperature=0, top_logprobs=5,
                                       logit_bias=((first.token_id, -100.0),))))
    assert biased.tokens[0].token_id != first.token_id
    # the new first token is the model's runner-up, with its unbiased logprob (raw logprobs)
    runner_up = plain.tokens[0].top_logprobs[1]
    assert biased.tokens[0].token == runner_up.token
    assert abs(biased.tokens[0].logprob - runner_up.logprob) < 1e-4
    assert [a.logprob for a in biased.tokens[0].top_logprobs] == [a.logprob for a in first.top_logprobs]
    boosted = run(backend.generate(chat("What is the capital of France?", max_tokens=2, temperature=0,
                                        logit_bias=((backend.engine.tokenize("zebra", add_special=False)[0], 100.0),))))
    assert boosted.tokens[0].token_id == backend.engine.tokenize("zebra", add_special=False)[0]


def test_logit_bias_is_applied_when_sampling_too(backend: LlamaCppBackend) -> None:
    banned = {t.token_id for t in run(backend.generate(chat("Count: one two", max_tokens=8, temperature=0))).tokens}
    params: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 3,
                              "logit_bias": tuple((t, -100.0) for t in sorted(banned))}
    gen = run(backend.generate(chat("Count: one two", **params)))
    assert gen.tokens and not banned & {t.token_id for t in gen.tokens}


def test_penalties_reduce_repetition(backend: LlamaCppBackend) -> None:
    prompt = "Repeat the word 'apple' many times: apple apple apple apple apple apple"
    plain = run(backend.generate(GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=24, temperature=0))))
    penalised = run(backend.generate(GenerationRequest(prompt=prompt, params=SamplingParams(
        max_tokens=24, temperature=0, presence_penalty=1.5, frequency_penalty=1.5))))

    def most_repeated(gen: object) -> int:
        ids = [t.token_id for t in gen.tokens]  # type: ignore[attr-defined]
        return max(ids.count(t) for t in set(ids))

    assert most_repeated(plain) >= 8, plain.text  # the model does repeat itself here
    assert most_repeated(penalised) < most_repeated(plain) / 2, penalised.text


def test_a_logit_bias_outside_the_vocabulary_is_a_400(backend: LlamaCppBackend) -> None:
    from localroute.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        run(backend.generate(chat("Hi", max_tokens=2, logit_bias=((backend.engine.n_vocab, 1.0),))))
    assert err.value.param == "logit_bias"


# ---------------------------------------------------------------- routing signals (issue 18)

SENTIMENT = ("negative", "neutral", "positive")
LABEL_FIRST = "Reply with the answer alone, written exactly as one of the options the user gives. No explanation."


def _choice(text: str, labels: tuple[str, ...], **params: Any) -> GenerationRequest:
    messages = ({"role": "system", "content": LABEL_FIRST},
                {"role": "user", "content": f"{text} Options: {', '.join(labels)}."})
    return GenerationRequest(messages=messages, params=SamplingParams(**{"max_tokens": 12, "temperature": 0,
                                                                       "stop": ("\n",), **params}), labels=labels)


def _reference_label_logprobs(smollm2_path: Path, context: list[int], conts: dict[str, list[int]],
                              prompt_len: int) -> dict[str, float]:
    """log P(continuation | context) from llama-cpp-python's own logits (logits_all), each label
    from a fresh evaluation of context + label: `prompt_len` >= 0 in the engine's decode shapes (the
    prompt in one batch, the answer's tokens one at a time, the label in one), -1 all in one batch.
    On an AVX2 CPU (Zen 3), whose batched and single-token matmul kernels round differently, the
    two differ by up to 0.08 nats; on the AVX-512 and AMX machines they agreed within 1e-3."""
    from localroute.backends.cpu_features import llama_class

    Llama = llama_class(False)
    ref = Llama(str(smollm2_path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    out = {}
    for label, toks in conts.items():
        ref.reset()
        if prompt_len < 0:
            ref.eval(context + toks)
        else:
            ref.eval(context[:prompt_len])
            for t in context[prompt_len:]:
                ref.eval([t])
            ref.eval(toks)
        total = 0.0
        for j, t in enumerate(toks):
            row = np.asarray(ref.scores[len(context) + j - 1], dtype=np.float64)
            total += float(row[t] - (row.max() + np.log(np.exp(row - row.max()).sum())))
        out[label] = total
    return out


@pytest.mark.parametrize("labels", [SENTIMENT, ("card_arrival", "card_linking", "card_not_working", "cash_withdrawal")])
def test_label_scores_equal_a_full_evaluation_of_each_label(backend: LlamaCppBackend, smollm2_path: Path,
                                                            labels: tuple[str, ...]) -> None:
    """Every label's log P(label | prompt + answer before it), scored in the request's KV cache with
    shared prefixes fed once, equals llama-cpp-python's logits for context + label evaluated from
    scratch; the signal is the chosen label's share of the labels' mass."""
    request = _choice("Classify this bank customer message: my new card has not arrived yet.", labels)
    gen = run(backend.generate(request))
    info = gen.extra["label"]
    assert info["chosen"] in labels, gen.text
    from localroute.backends.labels import locate_label

    span = locate_label(gen.text, labels)
    assert span is not None
    start = len(gen.text[: span.start].encode())
    ends, pos = [], 0
    for t in gen.tokens:
        pos += len(bytes(t.bytes or b""))
        ends.append(pos)
    i = sum(1 for e in ends if e <= start)
    lead = b"".join(bytes(t.bytes or b"") for t in gen.tokens)[(ends[i - 1] if i else 0):start]
    prompt = backend.prompt_tokens(request)
    context = prompt + [t.token_id for t in gen.tokens[:i]]
    conts = {lab: backend.engine.tokenize((lead + text.encode()).decode(), add_special=False)
             for lab, text in span.candidates}
    # the engine's KV for the context came in one of two batch shapes (the answer's tokens decoded
    # one at a time, or a prefix-cache hit prefilled in one batch): its numbers must be one of them
    refs = [_reference_label_logprobs(smollm2_path, context, conts, shape) for shape in (len(prompt), -1)]
    assert any(all(abs(info["raw"][lab] - ref[lab]) < 1e-3 for lab in labels) for ref in refs), (info["raw"], refs)
    probs = {k: np.exp(v) for k, v in info["raw"].items()}
    assert info["logprob"] == pytest.approx(np.log(probs[info["chosen"]] / sum(probs.values())), abs=1e-5)
    assert info["cost_s"] > 0 and info["tokens_fed"] >= 2


def test_label_scoring_leaves_the_next_answer_unchanged(backend: LlamaCppBackend) -> None:
    """The cache is cut back after scoring: the same request again (its prompt now a prefix-cache
    hit) gives the same tokens, logprobs and label score."""
    request = _choice("What is the sentiment of: I love this phone!", SENTIMENT, top_logprobs=5)
    first, second = run(backend.generate(request)), run(backend.generate(request))
    assert [(t.token_id, t.logprob) for t in first.tokens] == [(t.token_id, t.logprob) for t in second.tokens]
    assert first.extra["label"] == {**second.extra["label"], "cost_s": first.extra["label"]["cost_s"]}
    plain = run(backend.generate(chat("What is the sentiment of: I love this phone!", max_tokens=8, temperature=0)))
    assert "label" not in plain.extra  # no labels, no scoring


def test_json_enum_label_and_grammar_forced_tokens(backend: LlamaCppBackend) -> None:
    """A json_schema enum names the labels; tokens the grammar allowed alone are listed (each has
    logprob 0 over the allowed tokens) and field confidence leaves them out."""
    from localroute.routing.confidence import field_confidences

    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": list(SENTIMENT)}},
              "required": ["label"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    request = GenerationRequest(messages=({"role": "user", "content": "Sentiment of 'I love it' as JSON."},),
                                params=SamplingParams(max_tokens=24, temperature=0, response_format=fmt))
    gen = run(backend.generate(request))
    label = gen.extra["label"]
    assert label["chosen"] in SENTIMENT and label["logprob"] <= 0.0, gen.text
    assert set(label["raw"]) == set(SENTIMENT)
    forced = gen.extra.get("forced_tokens", [])
    assert forced, "the grammar forces some tokens of a one-key enum document"
    assert all(gen.tokens[i].logprob == pytest.approx(0.0, abs=1e-6) for i in forced)
    per_field = field_confidences(gen.tokens, forced)
    assert per_field is not None and set(per_field) == {"label"}


@pytest.mark.parametrize("aggregator", ["mean_logprob", "min_logprob", "quantile_logprob", "sum_logprob"])
def test_early_exit_gives_the_same_decision_with_less_decoding(backend: LlamaCppBackend, aggregator: str) -> None:
    """The real engine with the bound: wherever it stops early, the full answer (decoded without
    the bound) is below the threshold too; otherwise the answer is the same token for token."""
    from localroute.routing.confidence import answer_confidence
    from localroute.types import EscalationBound

    stopped = 0
    for prompt in ("Write a long poem about the sea.", "What is 2+2?", "Name a colour."):
        for threshold in (-0.3, -1.0, -3.0):
            params = SamplingParams(max_tokens=32, temperature=0, top_logprobs=5)
            req = GenerationRequest(messages=({"role": "user", "content": prompt},), params=params)
            full = run(backend.generate(req))
            bound = EscalationBound(aggregator, threshold, 0.1)
            early = run(backend.generate(GenerationRequest(messages=req.messages, params=params, escalate_below=bound)))
            conf = answer_confidence(aggregator, full.tokens, 0.1, full.text)
            assert conf is not None
            if "early_exit" in early.extra:
                stopped += 1
                assert conf < threshold
                assert early.completion_tokens < full.completion_tokens or conf < threshold
                assert [t.logprob for t in early.tokens] == [t.logprob for t in full.tokens[: len(early.tokens)]]
            else:
                assert [t.token_id for t in early.tokens] == [t.token_id for t in full.tokens]
    assert stopped > 0


def test_labels_are_scored_only_when_the_signal_needs_them(backend: LlamaCppBackend) -> None:
    """The engine scores a choice task's labels (engine time every other request waits for) only
    when the router decides on label_confidence, and never for an answer stopped early."""
    from dataclasses import replace

    from localroute.routing import CascadeRouter, Tier
    from localroute.types import EscalationBound

    request = _choice("What is the sentiment of: I love this phone!", SENTIMENT)
    tier = Tier("a", backend, -1e9)
    for aggregator, scored in (("mean_logprob", False), ("label_confidence", True)):
        asked = CascadeRouter([tier, Tier("f", backend, None)], aggregator)._tier_request(request, tier)
        gen = run(backend.generate(asked))
        assert ("label" in gen.extra) is scored, aggregator
    early = replace(request, escalate_below=EscalationBound("mean_logprob", 0.0))  # logprob 0 is out of reach
    gen = run(backend.generate(early))
    assert "early_exit" in gen.extra and "label" not in gen.extra

