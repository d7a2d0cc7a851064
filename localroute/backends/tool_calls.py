"""Tool calling on a local llama.cpp tier: the tools in the prompt, the answer held to a call by a
grammar, and the call returned in OpenAI's `tool_calls` shape.

The prompt: a chat template that reads `tools` (Hermes, Qwen, Llama 3.1 style) gets them; one that
ignores them (SmolLM2's ChatML) gets a system preamble listing each function's JSON definition and
the answer's form. The answer: `{"name": <one of the tools>, "arguments": <that tool's parameters>}`,
a JSON schema compiled to a GBNF grammar (backends/grammar.py), so every call parses and its
arguments validate against the tool's schema (as far as llama.cpp's schema converter goes: types,
required keys, enums, consts, nesting). The name comes first, so the grammar's branch, and the
answer's confidence, follow from the name and then the argument tokens (the tokens the grammar
forces, with a renormalised logprob of exactly 0, are left out of the answer's tokens).

`tool_choice`: "none" sends no tools (a text answer); "required" and a named function force a call
(named: that function's branch only); "auto" is treated as "required" when tools are given, since a
grammar for "text or a call" would let the model's first token decide alone and a small local
model rarely chooses well.

Parallel calls: only when the client sends `parallel_tool_calls: true` (and names no function)
the grammar takes one or more calls, one per line (`calls_gbnf`): a single call is the same text
as one call alone, and after each call the model chooses between ending and a newline and another
call. Omitted (or false, or a named function) the answer is exactly one call: OpenAI's
`parallel_tool_calls` lets a model make several calls, it does not ask for them, and a small local
model offered the choice adds spurious ones (SmolLM2, greedy, asked whether it rains in London:
get_weather, then get_time and add(10, 10)), so several calls are opt-in here.
Each call is one `tool_calls` entry, each held to its own tool's schema by the grammar; a call
repeated word for word (SmolLM2 often repeats its first call, greedy too, and then goes on
repeating it) ends the answer where it starts (DecodeState.repeat_guard), and any repeat left is
kept once. A sampled answer that
keeps adding calls until max_tokens is cut, no call (finish_reason "length"), and the cascade
escalates it as any truncated call.

Logprobs: OpenAI's chat logprobs cover message content only (`content` is null for a tool call);
a local tier, like vLLM, reports the tokens it generated for the calls (every token, forced ones
too, so they concatenate to the calls' JSON) in `logprobs.content` when the client asks for
logprobs. They ride in `Generation.extra["call_tokens"]`; the server writes them. A choice of an
n > 1 answer cut by max_tokens (text, not a call) carries its tokens there too.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import replace
from typing import Any

from localroute.types import Generation, GenerationRequest

__all__ = ["call_schema", "calls_gbnf", "local_parallel_calls", "parse_calls", "repeated_call_start",
           "tool_call_answer", "with_tools_preamble"]

_CALL_RULE = "localroute-call"  # the one-call grammar's root, renamed when calls may repeat


def call_schema(tools: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The JSON schema of one call of one of `tools` (OpenAI function definitions)."""
    branches = []
    for fn in tools:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        branches.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def local_parallel_calls(request: GenerationRequest) -> bool:
    """Whether a local answer to `request` may hold several calls: it has tools and the client
    sent `parallel_tool_calls: true` (GenerationRequest keeps the value as sent, None when omitted)."""
    return bool(request.tools) and request.parallel_tool_calls is True


def calls_gbnf(one_call: str, parallel: bool) -> str:
    """The grammar of an answer from the grammar of one call (`schema_gbnf(call_schema(...))`):
    that call, or with `parallel` one or more of them separated by newlines."""
    if not parallel:
        return one_call
    if re.search(rf"^{_CALL_RULE} ::=", one_call, flags=re.MULTILINE) or not re.search(r"^root ::=", one_call, flags=re.MULTILINE):
        raise ValueError("unexpected grammar for a tool call")
    renamed = re.sub(r"^root ::=", f"{_CALL_RULE} ::=", one_call, count=1, flags=re.MULTILINE)
    return f'{renamed}\nroot ::= {_CALL_RULE} ("\\n" {_CALL_RULE})*\n'


def parse_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls of an answer: JSON objects one after another (whitespace between), each with a
    string `name` and an object `arguments`; None when the text is not that."""
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    i, end = 0, len(text)
    while True:
        while i < end and text[i].isspace():
            i += 1
        if i == end:
            break
        try:
            call, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return None
        calls.append(call)
    return calls or None


def repeated_call_start(text: str) -> int | None:
    """Where the last call of `text` starts when `text` is complete calls and that last one
    repeats an earlier call word for word (the engine ends such an answer there); else None."""
    decoder = json.JSONDecoder()
    calls: list[Any] = []
    i, end, start = 0, len(text), 0
    while True:
        while i < end and text[i].isspace():
            i += 1
        if i == end:
            break
        start = i
        try:
            call, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        calls.append(call)
    if len(calls) > 1 and calls[-1] in calls[:-1]:
        return start
    return None


def tools_preamble(tools: tuple[dict[str, Any], ...], parallel: bool = False) -> str:
    listed = "\n".join(json.dumps({k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None})
                       for fn in tools)
    several = " To call several functions at once, write one call per line." if parallel else ""
    return ("You can call these functions (JSON definitions):\n" + listed + "\n"
            'Answer with one call as JSON: {"name": <function name>, "arguments": <its arguments object>}.'
            + several)


def with_tools_preamble(messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...],
                        parallel: bool = False) -> list[dict[str, Any]]:
    """The messages with the tools described in the system message (a template that ignores `tools`)."""
    preamble = tools_preamble(tools, parallel)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{preamble}".lstrip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]


def tool_call_answer(gen: Generation) -> Generation:
    """A grammar-constrained answer (one or more calls) as an OpenAI chat.completion (kept in
    `raw`, which the server sends as is); the tokens stay, for the cascade's confidence. An answer
    cut by max_tokens is not a call: it stays text with finish_reason "length". n > 1
    (gen.choices): each choice is answered so, and `raw` holds every choice by its index."""
    if not gen.choices:
        return _one_answer(gen)
    answers = [_one_answer(g) for g in (gen, *gen.choices)]
    # a choice cut by max_tokens is text inside `raw` too: its tokens are its logprobs when asked,
    # as they are for a cut n = 1 answer (sent as plain text)
    answers = [a if a.raw is not None else replace(a, extra={**a.extra, "call_tokens": list(a.tokens)})
               for a in answers]
    first = answers[0]
    choices = [_raw_choice(a, i) for i, a in enumerate(answers)]
    raw = dict(first.raw) if first.raw is not None else {
        "object": "chat.completion", "created": int(time.time()), "model": gen.model}
    raw["choices"] = choices
    return replace(first, raw=raw, choices=answers[1:],
                   finish_reason=first.finish_reason if first.raw is not None else gen.finish_reason)


def _raw_choice(gen: Generation, index: int) -> dict[str, Any]:
    if gen.raw is not None:
        return {**gen.raw["choices"][0], "index": index}
    return {"index": index, "message": {"role": "assistant", "content": gen.text, "refusal": None},
            "logprobs": None, "finish_reason": gen.finish_reason}


def _one_answer(gen: Generation) -> Generation:
    if gen.finish_reason != "stop":
        return gen
    calls = parse_calls(gen.text)
    if calls is None:  # the grammar should make this impossible
        return gen
    unique: list[dict[str, Any]] = []
    for call in calls:  # a small model repeats a call word for word: the same call twice is one call
        if call not in unique:
            unique.append(call)
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [{
        "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
    } for call in unique]}
    # the tokens the grammar left no choice (its punctuation, the rest of a name once it is
    # unambiguous) have a renormalised logprob of exactly 0: they say nothing of the model, and
    # kept they would only dilute a mean; the confidence comes from the name and argument choices
    kept = [i for i, t in enumerate(gen.tokens) if t.logprob != 0.0]
    chosen = [gen.tokens[i] for i in kept]
    extra = dict(gen.extra)
    extra["call_tokens"] = list(gen.tokens)  # every generated token, for a client asking for logprobs
    if "forced_tokens" in extra:  # indexes of the unfiltered tokens: remapped onto the kept ones
        new_index = {old: new for new, old in enumerate(kept)}
        forced = [new_index[i] for i in extra.pop("forced_tokens") if i in new_index]
        if forced:
            extra["forced_tokens"] = forced
    raw = {"object": "chat.completion", "created": int(time.time()), "model": gen.model,
           "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}]}
    return replace(gen, tokens=chosen, finish_reason="tool_calls", raw=raw, extra=extra)
