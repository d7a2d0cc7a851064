"""Local tool calling's pieces: the call's schema, the tools preamble, the answer's OpenAI shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localroute.backends.tool_calls import (
    call_schema,
    calls_gbnf,
    parse_calls,
    repeated_call_start,
    tool_call_answer,
    with_tools_preamble,
)
from localroute.types import Generation, TokenLogprob

ADD = {"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
NOW = {"name": "now"}


def test_one_tool_is_one_branch_and_several_are_any_of() -> None:
    one = call_schema((ADD,))
    assert one["properties"]["name"] == {"const": "add"} and one["properties"]["arguments"] == ADD["parameters"]
    assert list(one["properties"]) == ["name", "arguments"]  # the name is generated first
    both = call_schema((ADD, NOW))
    assert [b["properties"]["name"]["const"] for b in both["anyOf"]] == ["add", "now"]
    assert both["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}


def test_the_preamble_joins_the_system_message_or_becomes_one() -> None:
    user = [{"role": "user", "content": "hi"}]
    (system, rest) = with_tools_preamble(user, (ADD,))
    assert system["role"] == "system" and '"name": "add"' in system["content"] and rest == user[0]
    (merged, _) = with_tools_preamble([{"role": "system", "content": "Be brief."}, *user], (ADD,))
    assert merged["content"].startswith("Be brief.\n\n") and '"name": "add"' in merged["content"]


def gen(text: str, reason: str = "stop") -> Generation:
    return Generation(text=text, tokens=[], finish_reason=reason, prompt_tokens=3, completion_tokens=5)  # type: ignore[arg-type]


def test_a_call_becomes_openais_tool_calls_shape() -> None:
    out = tool_call_answer(gen('{"name": "add", "arguments": {"a": 1}}'))
    assert out.finish_reason == "tool_calls" and out.raw is not None
    (choice,) = out.raw["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 1}


def test_a_call_cut_by_max_tokens_stays_text() -> None:
    cut = gen('{"name": "add", "argu', "length")
    assert tool_call_answer(cut) is cut and cut.raw is None


def test_tokens_the_grammar_forced_leave_the_confidence() -> None:
    tokens = [TokenLogprob(1, "{", 0.0), TokenLogprob(2, "add", -0.4), TokenLogprob(3, "1", -1.2)]
    answer = gen('{"name": "add", "arguments": {"a": 1}}')
    answer.tokens = tokens
    assert [t.token for t in tool_call_answer(answer).tokens] == ["add", "1"]


def test_forced_token_indexes_follow_the_kept_tokens() -> None:
    """extra['forced_tokens'] indexes gen.tokens: after the logprob-0 tokens are dropped it must
    index the kept list (or go), never point at the wrong tokens."""
    tokens = [TokenLogprob(1, "{", 0.0), TokenLogprob(2, "add", -0.4), TokenLogprob(3, ",", -0.01),
              TokenLogprob(4, "1", -1.2)]
    answer = gen('{"name": "add", "arguments": {"a": 1}}')
    answer.tokens = tokens
    answer.extra["forced_tokens"] = [0, 2]
    out = tool_call_answer(answer)
    assert [out.tokens[i].token for i in out.extra["forced_tokens"]] == [","]
    answer.extra["forced_tokens"] = [0]
    assert "forced_tokens" not in tool_call_answer(answer).extra


# ---- parallel calls: one or more calls, one per line ----

TWO = '{"name": "add", "arguments": {"a": 1}}\n{"name": "now", "arguments": {}}'


def test_several_calls_become_several_tool_calls_entries() -> None:
    out = tool_call_answer(gen(TWO))
    assert out.finish_reason == "tool_calls" and out.raw is not None
    (choice,) = out.raw["choices"]
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["add", "now"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1}, {}]
    assert len({c["id"] for c in calls}) == 2
    (again,) = tool_call_answer(gen(TWO.split("\n")[0] + "\n" + TWO)).raw["choices"]  # type: ignore[index]
    assert [c["function"]["name"] for c in again["message"]["tool_calls"]] == ["add", "now"]  # a repeat is one call


def test_parse_calls_takes_json_objects_in_a_row_and_nothing_else() -> None:
    assert parse_calls(TWO) == [{"name": "add", "arguments": {"a": 1}}, {"name": "now", "arguments": {}}]
    assert parse_calls(' {"name": "now", "arguments": {}} \n') == [{"name": "now", "arguments": {}}]
    for bad in ("", "  ", '{"name": "now"}', '[{"name": "now", "arguments": {}}]', '{"name": "now", "arguments": {}} x',
                '{"name": 3, "arguments": {}}', '{"name": "now", "arguments": {}}\n{"name": "now", "argu'):
        assert parse_calls(bad) is None, bad


def test_every_choice_of_n_is_answered_by_its_index() -> None:
    first, second, cut = gen(TWO), gen('{"name": "now", "arguments": {}}'), gen('{"name": "ad', "length")
    first.choices = [second, cut]
    out = tool_call_answer(first)
    assert out.raw is not None and [c["index"] for c in out.raw["choices"]] == [0, 1, 2]
    assert [c["finish_reason"] for c in out.raw["choices"]] == ["tool_calls", "tool_calls", "length"]
    assert len(out.raw["choices"][0]["message"]["tool_calls"]) == 2
    assert out.raw["choices"][2]["message"]["content"] == '{"name": "ad'
    assert [c.finish_reason for c in out.choices] == ["tool_calls", "length"]


def test_the_logprobs_tokens_are_every_generated_token() -> None:
    tokens = [TokenLogprob(1, "{", 0.0), TokenLogprob(2, "add", -0.4)]
    answer = gen('{"name": "add", "arguments": {"a": 1}}')
    answer.tokens = tokens
    out = tool_call_answer(answer)
    assert out.extra["call_tokens"] == tokens and out.tokens == tokens[1:]


def test_the_parallel_grammar_repeats_the_one_call_rule() -> None:
    one = 'root ::= "{" space "}"\nspace ::= " "?\n'
    assert calls_gbnf(one, parallel=False) == one
    many = calls_gbnf(one, parallel=True)
    assert many.startswith('localroute-call ::= "{" space "}"\n')
    assert many.rstrip().endswith('root ::= localroute-call ("\\n" localroute-call)*')
    with pytest.raises(ValueError):
        calls_gbnf('start ::= "x"\n', parallel=True)


@pytest.mark.slow
def test_the_grammar_takes_several_calls_only_when_parallel(smollm2_path: Path) -> None:
    """The compiled grammars on SmolLM2's vocabulary, fed hand-built answers token by token:
    the parallel grammar takes two calls one per line and ends after either; the one-call
    grammar refuses the newline that would start a second; neither takes a call that breaks
    its tool's schema."""
    from localroute.backends.grammar import constraint_for
    from localroute.backends.llama_cpp import LlamaEngine

    engine = LlamaEngine(smollm2_path, n_ctx_seq=128, n_parallel=1, n_threads=2)
    try:
        def takes(text: str, parallel: bool) -> tuple[bool, bool]:
            """(every token allowed in turn, may end there)."""
            grammar = constraint_for(engine, None, (ADD, NOW), parallel)
            assert grammar is not None
            row = np.zeros(engine.n_vocab, dtype=np.float32)
            for tok in engine.tokenize(text, add_special=False):
                if grammar.mask(row)[tok] < -1e29:
                    return False, False
                grammar.accept(tok)
            return True, bool(grammar.mask(row)[engine.eos] > -1e29)

        first = TWO.split("\n")[0]
        assert takes(TWO, True) == (True, True)
        assert takes(first, True) == (True, True)
        assert takes(first + "\n", True) == (True, False)  # a newline starts another call
        assert takes(first, False) == (True, True)
        assert takes(TWO, False)[0] is False
        assert takes(first + "\n", False)[0] is False
        assert takes('{"name": "add", "arguments": {"a": "one"}}', True)[0] is False  # a is an integer
        assert takes(first + '\n{"name": "sub", "arguments": {}}', True)[0] is False  # no such tool
    finally:
        engine.close()


def test_a_repeated_call_is_found_where_it_starts() -> None:
    first = '{"name": "add", "arguments": {"a": 1}}'
    assert repeated_call_start(first + "\n" + first) == len(first) + 1
    assert repeated_call_start(TWO + "\n" + first) == len(TWO) + 1
    for text in (first, TWO, first + "\n", first + "\n" + first[:-1], first + '\n{"name": "add", "arguments": {"a": 2}}'):
        assert repeated_call_start(text) is None, text


def test_the_decode_ends_an_answer_where_a_call_repeats() -> None:
    """DecodeState.repeat_guard: fed a call, a newline and the same call token by token, the
    answer ends (stop) once the repeat is complete, the repeat cut; without the guard it goes on."""
    from localroute.backends.decoding import DecodeState
    from localroute.types import SamplingParams

    first = '{"name": "add", "arguments": {"a": 1}}'
    pieces = [first[:9], first[9:30], first[30:], "\n", first[:20], first[20:]]
    for guard in (True, False):
        done: list[Any] = []
        state = DecodeState(request_id="r", prompt=[1, 2], params=SamplingParams(max_tokens=50), max_new=50,
                            sink=done.append, want_tokens=False, submitted_at=0.0, repeat_guard=guard)
        reasons = [state.token(i, p.encode(), -0.5, (), 0.0) for i, p in enumerate(pieces)]
        if guard:
            assert reasons[-1] == "stop" and reasons[:-1] == [None] * 5
            ((_, answer),) = done
            assert answer.text == first + "\n" and [t.token for t in answer.tokens] == pieces[:4]
            assert tool_call_answer(answer).finish_reason == "tool_calls"
        else:
            assert reasons == [None] * 6 and not done


@pytest.mark.parametrize(("sent", "value", "parallel"), [
    ({}, None, False),
    ({"parallel_tool_calls": None}, None, False),
    ({"parallel_tool_calls": False}, False, False),
    ({"parallel_tool_calls": True}, True, True),
    ({"parallel_tool_calls": True, "tool_choice": {"type": "function", "function": {"name": "add"}}}, False, False),
])
def test_several_local_calls_only_when_the_client_sends_true(sent: dict[str, Any], value: bool | None,
                                                             parallel: bool) -> None:
    """The request keeps the client's parallel_tool_calls as sent (None: omitted), through the
    engine process's pickle too; a local answer may hold several calls only for an explicit true
    without a named function."""
    import pickle

    from localroute.backends.tool_calls import local_parallel_calls
    from localroute.server.protocol import chat_request
    from localroute.server.schemas import ChatCompletionRequest
    from localroute.settings import Settings

    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": ADD}], **sent}
    req = chat_request(ChatCompletionRequest.model_validate(data), data, Settings(), "r")
    crossed = pickle.loads(pickle.dumps(req))
    assert req.parallel_tool_calls is value and crossed.parallel_tool_calls is value
    assert local_parallel_calls(crossed) is parallel
