"""Local tool calling's pieces: the call's schema, the tools preamble, the answer's OpenAI shape."""

from __future__ import annotations

import json

from localroute.backends.tool_calls import call_schema, tool_call_answer, with_tools_preamble
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
