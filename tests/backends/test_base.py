"""One contract for every local backend: the same prompts and the same assertions against each
engine that is available here (llama.cpp always; transformers on CPU when torch is installed;
vLLM where it imports and its engine starts). A new backend is added to KINDS and held to this."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from localroute.backends.base import Backend
from localroute.backends.threaded import EngineBridge
from localroute.errors import GenerationError, LocalrouteError
from localroute.types import Generation, GenerationRequest, SamplingParams, StreamDelta
from tests.backend_kit import KINDS, acquire, missing, release, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session", params=KINDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind: str = request.param
    reason = missing(kind)
    if reason is not None:
        pytest.skip(reason)
    try:
        b = acquire(kind)
    except LocalrouteError as exc:
        if kind != "vllm":
            raise
        pytest.skip(f"vLLM is installed but its engine cannot start here: {exc.message}")
    yield b
    release(kind)


def chat(text: str, **params: object) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=SamplingParams(**params))  # type: ignore[arg-type]


async def collect(backend: Backend, request: GenerationRequest) -> tuple[list[StreamDelta], Generation]:
    deltas = [d async for d in backend.stream(request)]
    final = deltas[-1].final
    assert final is not None, "the last delta must carry the Generation"
    assert all(d.final is None for d in deltas[:-1])
    return deltas, final


def test_generate_and_stream_agree(backend: Backend) -> None:
    request = chat("Name three colours.", max_tokens=16, temperature=0, top_logprobs=2)
    whole = run(backend.generate(request))
    deltas, final = run(collect(backend, request))
    assert whole.tokens, "no tokens generated"
    assert final.text == whole.text
    assert "".join(d.text for d in deltas) == whole.text
    assert [t.token_id for t in final.tokens] == [t.token_id for t in whole.tokens]
    streamed = [d.token for d in deltas if d.token is not None]
    assert [t.token_id for t in streamed] == [t.token_id for t in whole.tokens]
    for a, b in zip(final.tokens, whole.tokens, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    assert whole.prompt_tokens > 0 and whole.completion_tokens >= len(whole.tokens)


def test_logprobs_are_finite_and_top_logprobs_sorted(backend: Backend) -> None:
    gen = run(backend.generate(chat("What is the capital of France?", max_tokens=12, temperature=0, top_logprobs=5)))
    assert gen.tokens
    for tok in gen.tokens:
        assert math.isfinite(tok.logprob) and tok.logprob <= 1e-6
        tops = [t.logprob for t in tok.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert all(math.isfinite(x) and x <= 1e-6 for x in tops)
        # greedy: the chosen token is the most likely one, so it heads its own top list
        assert tok.token in [t.token for t in tok.top_logprobs]
        assert tok.logprob == pytest.approx(tops[0], abs=1e-4)
    assert sum(math.exp(x) for x in tops) <= 1.0 + 1e-4


def test_stop_sequence_cuts_the_answer(backend: Backend) -> None:
    free = run(backend.generate(chat("Write a sentence about the sea.", max_tokens=24, temperature=0)))
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = " " + words[2]
    cut = free.text.index(stop)
    gen = run(backend.generate(chat("Write a sentence about the sea.", max_tokens=24, temperature=0, stop=(stop,))))
    assert gen.finish_reason == "stop"
    assert gen.text == free.text[:cut]
    assert stop not in gen.text
    assert "".join(t.token for t in gen.tokens) == gen.text  # tokens past the cut are not reported
    deltas, final = run(collect(backend, chat("Write a sentence about the sea.", max_tokens=24, temperature=0,
                                              stop=(stop,))))
    assert "".join(d.text for d in deltas) == final.text == gen.text  # the stop string never streamed


def test_max_tokens_ends_with_length(backend: Backend) -> None:
    gen = run(backend.generate(chat("Write a long story about a dragon.", max_tokens=4, temperature=0)))
    assert gen.finish_reason == "length"
    assert len(gen.tokens) == gen.completion_tokens == 4


def test_seed_makes_sampling_repeatable(backend: Backend) -> None:
    request = chat("Invent a name for a cat.", max_tokens=10, temperature=1.2, seed=7)
    first = run(backend.generate(request))
    second = run(backend.generate(request))
    assert [t.token_id for t in first.tokens] == [t.token_id for t in second.tokens]
    others = {tuple(t.token_id for t in run(backend.generate(chat("Invent a name for a cat.", max_tokens=10,
                                                                     temperature=1.2, seed=s))).tokens)
              for s in (1, 2, 3)}
    assert len(others | {tuple(t.token_id for t in first.tokens)}) > 1, "different seeds never differ"


def test_any_int64_seed_samples_repeatably(backend: Backend) -> None:
    """OpenAI takes any int64 seed; -1 once killed the llama.cpp tier (numpy wants >= 0)."""
    for seed in (-1, -(2**63), 2**63 - 1):
        request = chat("Invent a name for a dog.", max_tokens=6, temperature=1.2, seed=seed)
        first, second = run(backend.generate(request)), run(backend.generate(request))
        assert first.tokens and [t.token_id for t in first.tokens] == [t.token_id for t in second.tokens]
    assert backend.health()["ok"] is True


class _FailingRng:
    """A request's sampler that gives `good` draws, then raises: a fault inside one request's own
    decoding, on the engine thread."""

    def __init__(self, good: int) -> None:
        self.left = good

    def random(self) -> float:
        if self.left == 0:
            raise RuntimeError("sampler failed")
        self.left -= 1
        return 0.5


def test_a_request_whose_sampler_raises_ends_alone(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its stream ends with a GenerationError after the tokens it had; a request decoding beside
    it finishes; the engine stays up (health ok, no slot held) and answers the next request."""
    if not isinstance(backend, EngineBridge):
        pytest.skip("the fault is injected into a thread-driven engine's per-request state")
    real_job = backend._job

    def job(request: GenerationRequest, sink: Any, want_tokens: bool) -> Any:
        made = real_job(request, sink, want_tokens)
        if request.request_id == "doomed":
            made.rng = _FailingRng(good=3)  # the sampler is a cached property: this one is used instead
        return made

    monkeypatch.setattr(backend, "_job", job)
    doomed = GenerationRequest(messages=({"role": "user", "content": "Tell me a story."},), request_id="doomed",
                               params=SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True))
    fine = chat("Count to ten.", max_tokens=16, temperature=0, ignore_eos=True)
    tokens: list[StreamDelta] = []

    async def stream_doomed() -> None:
        async for delta in backend.stream(doomed):
            if delta.token is not None:
                tokens.append(delta)

    async def both() -> list[Any]:
        return list(await asyncio.gather(stream_doomed(), backend.generate(fine), return_exceptions=True))

    error, other = run(both())
    assert isinstance(error, GenerationError) and error.code == "generation_failed", error
    assert len(tokens) == 3
    assert isinstance(other, Generation) and len(other.tokens) == 16
    deadline = time.monotonic() + 30  # the engine thread lets go of a batch just after its last answer
    while backend.health().get("active", 0) and time.monotonic() < deadline:
        run(_sleep(0.05))
    health = backend.health()
    assert health["ok"] is True and health.get("active", 0) == 0, health
    assert run(backend.generate(chat("Say hi.", max_tokens=3, temperature=0))).tokens


def test_raw_prompt_completion(backend: Backend) -> None:
    gen = run(backend.generate(GenerationRequest(prompt="The capital of France is",
                                                 params=SamplingParams(max_tokens=6, temperature=0))))
    assert gen.tokens and gen.prompt_tokens >= 5
    assert gen.finish_reason in ("stop", "length")


def test_concurrent_requests_all_complete(backend: Backend) -> None:
    import asyncio

    prompts = ["Say hello.", "Count to three.", "Name a fruit.", "What colour is the sky?"]

    async def many() -> list[Generation]:
        return list(await asyncio.gather(*(backend.generate(chat(p, max_tokens=8, temperature=0)) for p in prompts)))

    gens = run(many())
    assert len(gens) == 4
    assert all(g.tokens and all(math.isfinite(t.logprob) for t in g.tokens) for g in gens)


def test_abandoned_stream_frees_its_slot(backend: Backend) -> None:
    async def take_two() -> int:
        agen = backend.stream(chat("Write a long story about a dragon.", max_tokens=200, temperature=0))
        n = 0
        async for _ in agen:
            n += 1
            if n == 2:
                break
        await agen.aclose()  # what the server does when the client disconnects
        return n

    assert run(take_two()) == 2
    deadline = time.monotonic() + 60
    while backend.health().get("active", 0) and time.monotonic() < deadline:
        run(_sleep(0.05))
    assert backend.health().get("active", 0) == 0, backend.health()
    gen = run(backend.generate(chat("Say hi.", max_tokens=3, temperature=0)))  # the engine still answers
    assert gen.tokens


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


def test_health_reports_kind_and_model(backend: Backend) -> None:
    h = backend.health()
    assert h["ok"] is True and h["model"] and h["kind"] in ("llama_cpp", "transformers", "vllm")
    assert backend.is_local is True
    if h["kind"] != "llama_cpp":  # GPU-host engines state which logprobs their thresholds see
        assert h["logprobs_mode"] in ("raw_logprobs", "processed_logprobs")
        gen = run(backend.generate(chat("Hi", max_tokens=2, temperature=0)))
        assert gen.extra["logprobs_mode"] == h["logprobs_mode"]
