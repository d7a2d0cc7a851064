"""Per-request decode state shared by the thread-driven engines: sampler, stops, streaming."""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from localroute.backends.decoding import (
    EARLY_EXIT_AGGREGATORS,
    DecodeState,
    EarlyExit,
    LogitsAdjuster,
    adjuster_for,
    prompt_room,
    sample_token,
)
from localroute.errors import ContextLengthExceededError, InvalidRequestError
from localroute.routing.confidence import answer_confidence
from localroute.types import (
    EscalationBound,
    FinishReason,
    Generation,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)


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
    gen = st.finish("stop", cut)
    assert gen.text == "Hello " and events[-1] == ("done", gen)
    assert "".join(e[1][0] for e in events if e[0] == "token") == "Hello "


def test_token_records_streams_and_finishes_in_one_call() -> None:
    st, events = state(stop=["!"])
    assert st.token(7, b"Hi", -0.5, (), now=2.0) is None
    assert st.first_token_at == 2.0 and events == [("token", ("Hi", TokenLogprob(7, "Hi", -0.5, (72, 105))))]
    assert st.token(8, b" there!", -0.1, (), now=3.0) == "stop"
    gen = events[-1][1]
    assert events[-1][0] == "done" and gen.text == "Hi there" and gen.finish_reason == "stop"
    assert st.first_token_at == 2.0 and gen.ttft_s == 2.0 and [t.token_id for t in gen.tokens] == [7]


def test_an_end_of_sequence_token_ends_the_answer_without_joining_it() -> None:
    st, events = state()
    st.model, st.extra = "m", {"device": "cpu"}
    st.token(5, b"ok", -0.2, (), now=1.0)
    assert st.token(2, b"", -0.01, (), now=1.5, eos=True) == "stop"
    gen = events[-1][1]
    assert (gen.text, gen.finish_reason, gen.completion_tokens, gen.model) == ("ok", "stop", 1, "m")
    assert gen.extra == {"device": "cpu"} and gen.extra is not st.extra  # each answer its own dict


# ---- incremental detokenisation against the whole-text version it replaced ----


@dataclass(eq=False)
class WholeText(DecodeState):
    """The reference: decodes the whole answer again at every token (the code before it was
    made incremental), so every stream and answer can be compared with it."""

    def add(self, tok: TokenLogprob, raw: bytes) -> tuple[FinishReason | None, int | None]:
        self.tokens.append(tok)
        self.out += raw
        self.token_ends.append(len(self.out))
        if self.params.stop:
            text = codecs.utf_8_decode(bytes(self.out), "replace", False)[0]
            hit = min((i for s in self.params.stop if (i := text.find(s)) >= 0), default=-1)
            if hit >= 0:
                return "stop", hit
        if len(self.tokens) >= self.max_new:
            return "length", None
        return None, None

    def emit(self, tok: TokenLogprob) -> None:
        text = codecs.utf_8_decode(bytes(self.out), "replace", False)[0]
        safe = len(text)
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        piece = text[self.emitted_chars : safe] if safe > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, safe)
        self.emitted_tokens += 1
        self.sink(("token", (piece, tok)))


ALPHABET = ["a", "b", "E", "N", "D", " ", "\n", "é", "€", "😀", "中", "ab"]
BAD_BYTES = [b"\xff", b"\xe2\x82", b"\x80", b"\xf0\x9f\x98"]  # invalid or cut-off UTF-8


def _case(rng: random.Random) -> tuple[list[bytes], list[str], int, bool]:
    """Random answer bytes (multi-byte characters, sometimes broken UTF-8), split into tokens at
    random byte offsets (so characters and stop strings span tokens), with stop strings drawn
    from the same characters so they do occur."""
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
    data = bytearray(text.encode("utf-8"))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        at = rng.randint(0, len(data))
        data[at:at] = rng.choice(BAD_BYTES)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, len(data) + 2)))
    pieces = [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    stops = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.choice([0, 1, 2, 3]))]
    if rng.random() < 0.3:
        stops.append("END")
    return pieces, stops, rng.randint(1, len(pieces) + 3), rng.random() < 0.3


def _run(cls: type[DecodeState], pieces: list[bytes], stops: list[str], max_new: int, eos: bool,
         want_tokens: bool) -> tuple[list[tuple[str, Any]], list[FinishReason | None]]:
    events: list[tuple[str, Any]] = []
    st = cls("r", [1, 2], SamplingParams(stop=stops), max_new=max_new, sink=events.append, want_tokens=want_tokens,
             submitted_at=0.0, model="m")
    reasons: list[FinishReason | None] = []
    for i, raw in enumerate(pieces):
        reasons.append(st.token(i, raw, -0.1 * i, (), now=1.0))
        if reasons[-1] is not None:
            break
    else:
        reasons.append(st.token(99, b"", -0.01, (), now=1.0, eos=True) if eos else st.finish("length", None).finish_reason)
    return events, reasons


def _comparable(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Events with the Generation's wall-clock latency left out."""
    out: list[tuple[str, Any]] = []
    for kind, payload in events:
        if isinstance(payload, Generation):
            payload = (payload.text, payload.tokens, payload.finish_reason, payload.completion_tokens, payload.ttft_s)
        out.append((kind, payload))
    return out


@pytest.mark.parametrize("want_tokens", [True, False])
def test_incremental_detokenisation_matches_decoding_the_whole_text(want_tokens: bool) -> None:
    rng = random.Random(1234)
    stopped = multibyte_stops = 0
    for _ in range(3000):
        pieces, stops, max_new, eos = _case(rng)
        got = _run(DecodeState, pieces, stops, max_new, eos, want_tokens)
        want = _run(WholeText, pieces, stops, max_new, eos, want_tokens)
        assert _comparable(got[0]) == _comparable(want[0]), (pieces, stops, max_new)
        assert got[1] == want[1], (pieces, stops, max_new)
        stopped += want[1][-1] == "stop" and not eos
        multibyte_stops += any(ord(c) > 127 for s in stops for c in s) and want[1][-1] == "stop"
    assert stopped > 300 and multibyte_stops > 50  # the cases do reach the stop-string paths


def test_a_stop_string_split_inside_a_multibyte_character_is_found_and_held_back() -> None:
    st, events = state(stop=["€!"])
    for raw in [b"x\xe2", b"\x82", b"\xac"]:  # "€" arrives one byte at a time
        assert st.token(0, raw, -0.1, (), now=1.0) is None
    assert "".join(e[1][0] for e in events) == "x"  # "€" may start the stop string: held back
    assert st.token(0, b"!y", -0.1, (), now=1.0) == "stop"
    assert events[-1][1].text == "x" and "".join(e[1][0] for e in events if e[0] == "token") == "x"


def test_a_stop_string_after_invalid_bytes_cuts_at_the_stop_string() -> None:
    """Broken UTF-8 before the stop (a model emitting half an emoji) is a U+FFFD in the text; the
    cut lands at the stop string, not one character early per broken byte."""
    st, events = state(stop=["\n"])
    for raw in [b"\xf0\x9f", b"Neg", b"ative", b"\n", b"x"]:
        if st.token(0, raw, -0.1, (), now=1.0) == "stop":
            break
    gen = events[-1][1]
    assert gen.text == "\ufffdNegative" and gen.finish_reason == "stop"
    assert len(gen.tokens) == 3 and gen.completion_tokens == 4  # the stop's token is counted, not kept


def test_logit_bias_and_penalties_follow_openais_formula() -> None:
    """logits[t] + bias[t] - presence * (count[t] > 0) - frequency * count[t], counts over generated tokens."""
    params = SamplingParams(logit_bias=((1, -100.0), (4, 2.5)), presence_penalty=0.5, frequency_penalty=0.25)
    adj = LogitsAdjuster(params, n_vocab=6)
    row = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    assert adj.apply(row).tolist() == [0.0, -99.0, 2.0, 3.0, 6.5, 5.0]  # no tokens yet: bias only
    for t in (2, 2, 2, 5):
        adj.observe(t)
    expected = [0.0, -99.0, 2.0 - 0.5 - 0.75, 3.0, 6.5, 5.0 - 0.5 - 0.25]
    assert np.allclose(adj.apply(row), expected)
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the engine's row is never written


def test_negative_penalties_encourage_repetition() -> None:
    adj = LogitsAdjuster(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), n_vocab=3)
    adj.observe(0)
    assert adj.apply(np.zeros(3, dtype=np.float32)).tolist() == [1.5, 0.0, 0.0]


def test_no_bias_or_penalty_means_no_adjuster() -> None:
    assert adjuster_for(SamplingParams(), 10) is None
    assert adjuster_for(SamplingParams(presence_penalty=0.0, logit_bias=()), 10) is None
    assert adjuster_for(SamplingParams(frequency_penalty=0.1), 10) is not None


def test_a_bias_outside_the_vocabulary_is_a_400_naming_logit_bias() -> None:
    with pytest.raises(InvalidRequestError) as err:
        LogitsAdjuster(SamplingParams(logit_bias=((3, 1.0), (99, 1.0))), n_vocab=10)
    assert err.value.param == "logit_bias" and "99" in str(err.value)


def test_decode_state_counts_its_generated_tokens_for_the_penalties() -> None:
    params = SamplingParams(frequency_penalty=1.0)
    events: list[tuple[str, Any]] = []
    st = DecodeState("r", [7, 7, 7], params, max_new=8, sink=events.append, want_tokens=False, submitted_at=0.0,
                     adjuster=adjuster_for(params, 10))
    assert st.adjuster is not None
    st.token(3, b"a", -0.1, (), 0.0)
    st.token(3, b"a", -0.1, (), 0.0)
    out = st.adjuster.apply(np.zeros(10, dtype=np.float32))
    assert out[3] == -2.0 and out[7] == 0.0  # the prompt's tokens are not penalised


# ---------------------------------------------------------------- early escalation

_PIECES = ["a", " b", "c", "\n", "##", "é", " the", "x\n", "END", "#"]


def _random_answer(rng: random.Random, n: int) -> list[tuple[bytes, float, tuple[TopLogprob, ...]]]:
    out = []
    for _ in range(n):
        lp = -rng.expovariate(rng.choice([0.5, 3.0, 20.0]))  # mostly sure tokens, some unsure ones
        alts = sorted([lp, *(-rng.expovariate(1.0) - 0.01 for _ in range(rng.randint(0, 5)))], reverse=True)
        out.append((rng.choice(_PIECES).encode(), lp, tuple(TopLogprob(str(i), a) for i, a in enumerate(alts))))
    return out


def _decode(answer: list[tuple[bytes, float, tuple[TopLogprob, ...]]], stop: tuple[str, ...], max_new: int,
            bound: EscalationBound | None) -> Generation:
    """Feed a scripted answer through DecodeState as an engine would; end with EOS if nothing ends it."""
    events: list[tuple[str, Any]] = []
    st = DecodeState("r", [1, 2], SamplingParams(stop=stop, max_tokens=max_new), max_new=max_new,
                     sink=events.append, want_tokens=False, submitted_at=0.0)
    if bound is not None:
        st.early_exit = EarlyExit(bound, max_new, stop)
    for i, (raw, lp, top) in enumerate(answer):
        if st.token(i + 10, raw, lp, top, 0.0) is not None:
            break
    else:
        st.token(0, b"", 0.0, (), 0.0, eos=True)
    done = [p for k, p in events if k == "done"]
    assert len(done) == 1
    gen: Generation = done[0]
    return gen


@pytest.mark.parametrize("aggregator", EARLY_EXIT_AGGREGATORS)
def test_early_exit_never_escalates_an_answer_that_would_be_accepted(aggregator: str) -> None:
    """Property over random answers, stop strings, max_tokens and thresholds: whenever the bound
    stops a decode, the full answer (decoded without it) scores below the threshold too, computed
    by routing.confidence, the cascade's own function. And the bound is not vacuous."""
    rng = random.Random(sum(map(ord, aggregator)))
    fired = 0
    for _ in range(400):
        max_new = rng.randint(1, 40)
        answer = _random_answer(rng, rng.randint(1, max_new + 3))
        stop = rng.choice([(), ("\n",), ("END", "##")])
        bound = EscalationBound(aggregator, rng.uniform(-3.0, -0.01), rng.choice([0.1, 0.5, 0.9]))
        full = _decode(answer, stop, max_new, None)
        early = _decode(answer, stop, max_new, bound)
        conf = answer_confidence(aggregator, full.tokens, bound.alpha, full.text)
        accepted = conf is not None and conf >= bound.threshold
        if "early_exit" in early.extra:
            fired += 1
            assert not accepted, (aggregator, bound, [t.logprob for t in full.tokens], stop)
            # the tokens it kept are the start of the full answer
            assert [t.logprob for t in early.tokens] == [t.logprob for t in full.tokens[: len(early.tokens)]]
        else:
            assert [t.logprob for t in early.tokens] == [t.logprob for t in full.tokens]
    assert fired >= 10  # the bound does stop decodes (not a vacuous pass)


def test_early_exit_mean_bound_is_what_max_tokens_allows() -> None:
    """mean_logprob: one -8 token with 4 of max 8 tokens to go can still reach -1 (at 0 each), at
    -8.1 it cannot: S / max_new < threshold."""
    bound = EscalationBound("mean_logprob", -1.0)
    ok = EarlyExit(bound, 8, ())
    toks = [TokenLogprob(1, "a", -8.0)]
    assert not ok.lost(toks, [1], 1)
    lost = EarlyExit(bound, 8, ())
    assert lost.lost([TokenLogprob(1, "a", -8.1)], [1], 1) and lost.best == pytest.approx(-8.1 / 8)
    assert not EarlyExit.supports(EscalationBound("mean_margin", 1.0))


def test_early_exit_waits_for_tokens_a_stop_string_could_still_cut() -> None:
    """With a stop string the last few bytes are not yet certain: a -50 token that the stop
    string then removes must not stop the decode."""
    bound = EscalationBound("min_logprob", -5.0)
    answer = [(b"ok", -0.1, ()), (b"#", -50.0, ()), (b"#", -0.1, ())]
    gen = _decode(answer, ("##",), 10, bound)
    assert "early_exit" not in gen.extra and gen.text == "ok" and gen.finish_reason == "stop"
