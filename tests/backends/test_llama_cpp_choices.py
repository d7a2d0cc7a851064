"""n > 1 on the llama.cpp engine: the choices decode as parallel sequences that share the prompt's
KV cache (the prompt prefilled once, copied to the other choices' sequences), each with its own
sampler. The real SmolLM2 model; numbers compared with plain n = 1 requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.types import Generation, GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = ({"role": "user", "content": "Write one sentence about the sea."},)


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> Iterator[LlamaCppBackend]:
    engine = LlamaEngine(smollm2_path, n_ctx_seq=256, n_parallel=3, n_threads=2)
    yield LlamaCppBackend("smollm2-135m", engine)
    engine.close()


def request(n: int, **params: object) -> GenerationRequest:
    base = SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=n, top_logprobs=2)
    return GenerationRequest(messages=MESSAGES, params=replace(base, **params))  # type: ignore[arg-type]


def every(gen: Generation) -> list[Generation]:
    return [gen, *gen.choices]


def test_choices_share_one_prefill_and_match_separate_requests(backend: LlamaCppBackend) -> None:
    """n = 3 prefills the prompt once (two KV copies), and each choice is exactly the answer a
    separate request on a fresh prefill gives: choice 0 the n = 1 answer for the seed, the
    others distinct, all the same again for the same seed."""
    stats = backend.engine.stats
    before = dict(stats)
    gen = asyncio.run(backend.generate(request(3)))
    assert stats["prompts_prefilled_total"] - before["prompts_prefilled_total"] == 1
    assert stats["kv_copies_total"] - before["kv_copies_total"] == 2
    assert stats["prompt_tokens_shared_total"] - before["prompt_tokens_shared_total"] == 2 * gen.prompt_tokens
    choices = every(gen)
    assert len(choices) == 3 and len({c.text for c in choices}) == 3, [c.text for c in choices]
    assert gen.completion_tokens == sum(len(c.tokens) for c in choices)
    again = asyncio.run(backend.generate(request(3)))
    assert [c.text for c in every(again)] == [c.text for c in choices]
    assert [[t.logprob for t in c.tokens] for c in every(again)] == [[t.logprob for t in c.tokens] for c in choices]
    single = asyncio.run(backend.generate(request(1)))
    assert single.text == choices[0].text
    assert [t.logprob for t in single.tokens] == [t.logprob for t in choices[0].tokens]


def test_copied_prompt_gives_the_logprobs_of_a_prefilled_one(backend: LlamaCppBackend) -> None:
    """Greedy n = 3: the copied sequences decode the same tokens with the same logprobs, bit for
    bit, as the sequence that prefilled the prompt (and as an n = 1 request)."""
    gen = asyncio.run(backend.generate(request(3, temperature=0.0)))
    single = asyncio.run(backend.generate(request(1, temperature=0.0)))
    for c in every(gen):
        assert c.text == single.text
        assert [t.logprob for t in c.tokens] == [t.logprob for t in single.tokens]
        assert [t.top_logprobs for t in c.tokens] == [t.top_logprobs for t in single.tokens]


def test_more_choices_than_slots_run_in_waves(backend: LlamaCppBackend) -> None:
    """n = 7 on 3 slots: waves of 3, 3 and 1, in turn; every choice answers, the prompt is
    prefilled once per wave, the later waves mostly from the prefix cache."""
    stats = backend.engine.stats
    before = dict(stats)
    gen = asyncio.run(backend.generate(request(7, max_tokens=4)))
    assert len(every(gen)) == 7 and all(c.tokens for c in every(gen))
    assert stats["prompts_prefilled_total"] - before["prompts_prefilled_total"] == 3
    assert stats["kv_copies_total"] - before["kv_copies_total"] == 4
    cached = stats["prompt_tokens_cached_total"] - before["prompt_tokens_cached_total"]
    assert cached >= 2 * (gen.prompt_tokens - 2)
    settled(backend.engine)


def settled(engine: LlamaEngine) -> None:
    """Every slot free and no KV reserved, once the engine thread has ended its step (a choice's
    answer reaches the caller before the step's end frees its slot)."""
    for _ in range(100):
        if engine.load()["active"] == 0:
            break
        time.sleep(0.05)
    assert engine.load()["free_slots"] == 3 and engine.load()["kv_reserved"] == 0


def test_streamed_choices_carry_their_index(backend: LlamaCppBackend) -> None:
    async def run() -> tuple[dict[int, str], Generation]:
        texts: dict[int, str] = {}
        final = None
        async for d in backend.stream(request(2)):
            if d.final is not None:
                final = d.final
            else:
                texts[d.index] = texts.get(d.index, "") + d.text
        assert final is not None
        return texts, final

    texts, final = asyncio.run(run())
    assert set(texts) == {0, 1}
    assert [texts[0], texts[1]] == [c.text for c in every(final)]


def test_a_cancelled_request_frees_every_choice_slot(backend: LlamaCppBackend) -> None:
    async def run() -> None:
        task = asyncio.create_task(backend.generate(request(3, max_tokens=200)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    settled(backend.engine)
    gen = asyncio.run(backend.generate(request(2, max_tokens=3)))  # and the engine goes on
    assert len(every(gen)) == 2


def test_the_counters_count_every_choice(backend: LlamaCppBackend) -> None:
    """requests_total counts an n > 1 request's sequences, as completed_total does: n = 3 adds
    three to each (with two waves, n = 4 too), so finished and accepted stay comparable."""
    stats = backend.engine.stats
    for n in (3, 4):
        before = dict(stats)
        asyncio.run(backend.generate(request(n, max_tokens=3)))
        assert stats["requests_total"] - before["requests_total"] == n
        assert stats["completed_total"] - before["completed_total"] == n


def test_a_streamed_choice_finishes_when_it_is_done(backend: LlamaCppBackend) -> None:
    """n = 3 streamed, the choices ending at the first '.': each choice but the last to end gets
    its finish delta (finish_reason, no text) as soon as it is done, while the others still
    stream, as OpenAI sends a choice's finish_reason; the final delta carries every choice."""
    async def run() -> tuple[list[tuple[int, str, str | None]], Generation]:
        events: list[tuple[int, str, str | None]] = []  # (index, text, finish_reason)
        final = None
        async for d in backend.stream(request(3, max_tokens=48, stop=(".",), temperature=1.0, seed=3)):
            if d.final is not None:
                final = d.final
            else:
                events.append((d.index, d.text, d.finish_reason))
        assert final is not None
        return events, final

    events, final = asyncio.run(run())
    finishes = [(i, pos) for pos, (i, text, reason) in enumerate(events) if reason is not None]
    assert all(not events[pos][1] for _, pos in finishes)  # a finish delta has no text
    assert len(finishes) == 2 and len({i for i, _ in finishes}) == 2  # the last one's is the final delta
    lengths = [len(c.tokens) for c in every(final)]
    assert len(set(lengths)) > 1, lengths  # they do end at different steps
    first, pos = finishes[0]
    assert any(i != first and text for i, text, _ in events[pos + 1:])  # others streamed on after it
    for i, p in finishes:  # nothing of a choice after its finish, and its reason is the final one's
        assert not any(j == i for j, _, _ in events[p + 1:])
        assert events[p][2] == every(final)[i].finish_reason
    texts: dict[int, str] = {}
    for i, text, _ in events:
        texts[i] = texts.get(i, "") + text
    assert [texts[i] for i in range(3)] == [c.text for c in every(final)]
