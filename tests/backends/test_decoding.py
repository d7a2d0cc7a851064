"""Per-request decode state shared by the thread-driven engines: sampler, stops, streaming."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from localroute.backends.decoding import DecodeState, prompt_room, sample_token
from localroute.errors import ContextLengthExceededError, InvalidRequestError
from localroute.types import SamplingParams, TokenLogprob


def state(**params: Any) -> tuple[DecodeState, list[tuple[str, Any]]]:
    events: list[tuple[str, Any]] = []
    st = DecodeState("r", [1, 2, 3], SamplingParams(**params), max_new=8, sink=events.append, want_tokens=True,
                     submitted_at=0.0)
    return st, events


def tok(text: str) -> TokenLogprob:
    return TokenLogprob(0, text, -0.1, tuple(text.encode()))


def test_sampler_is_made_on_first_use_from_the_seed() -> None:
    st, _ = state(temperature=1.0, seed=5)
    assert "rng" not in st.__dict__  # nothing built on the request path (greedy never needs one)
    first = st.rng
    assert st.rng is first
    assert first.random() == np.random.default_rng(5).random()


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_any_int64_seed_makes_a_sampler(seed: int) -> None:
    """numpy takes only non-negative seeds (-1 raised ValueError in the engine thread and killed
    the tier); the seed's 64 bits are read unsigned, so distinct int64 seeds stay distinct."""
    st, _ = state(temperature=1.0, seed=seed)
    assert st.rng.random() == np.random.default_rng(seed % 2**64).random()
    assert SamplingParams(seed=-1).rng_seed == 2**64 - 1 and SamplingParams(seed=None).rng_seed is None


@pytest.mark.parametrize("temperature", [1e-300, 1e-6, 5e-324])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    """In float32, 1/T overflows: 1e-300 turned every probability into NaN and sampled noise."""
    row = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    rng = np.random.default_rng(0)
    with np.errstate(all="raise"):
        assert {sample_token(row, SamplingParams(temperature=temperature), rng) for _ in range(20)} == {1}


def test_prompt_room() -> None:
    assert prompt_room([1, 2, 3], 10) == 7
    with pytest.raises(InvalidRequestError):
        prompt_room([], 10)
    with pytest.raises(ContextLengthExceededError):
        prompt_room([1] * 10, 10)


def test_top_p_never_samples_outside_the_nucleus() -> None:
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)
    picks = {sample_token(row, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 covers 0.7; the tail never comes up


def test_a_stream_holds_back_a_possible_stop_string_and_cuts_it() -> None:
    st, events = state(stop=["END"])
    for piece in ["Hello ", "E", "N"]:
        reason, _ = st.add(tok(piece), piece.encode())
        assert reason is None
        st.emit(tok(piece))
    assert "".join(e[1][0] for e in events) == "Hello "  # "EN" may still become the stop string
    reason, cut = st.add(tok("D"), b"D")
    assert (reason, cut) == ("stop", 6)
    gen = st.finish("stop", cut, model="m")
    assert gen.text == "Hello " and events[-1] == ("done", gen)
    assert "".join(e[1][0] for e in events if e[0] == "token") == "Hello "
