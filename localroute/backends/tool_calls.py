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
model rarely chooses well. One call per answer (parallel calls are not generated locally).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any

from localroute.types import Generation

__all__ = ["call_schema", "tool_call_answer", "with_tools_preamble"]


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


def tools_preamble(tools: tuple[dict[str, Any], ...]) -> str:
    listed = "\n".join(json.dumps({k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None})
                       for fn in tools)
    return ("You can call these functions (JSON definitions):\n" + listed + "\n"
            'Answer with one call as JSON: {"name": <function name>, "arguments": <its arguments object>}.')


def with_tools_preamble(messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The messages with the tools described in the system message (a template that ignores `tools`)."""
    preamble = tools_preamble(tools)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{preamble}".lstrip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]


def tool_call_answer(gen: Generation) -> Generation:
    """A grammar-constrained call as an OpenAI chat.completion (kept in `raw`, which the server
    sends as is); the tokens stay, for the cascade's confidence. An answer cut by max_tokens is
    not a call: it stays text with finish_reason "length"."""
    if gen.finish_reason != "stop":
        return gen
    try:
        call = json.loads(gen.text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError):  # the grammar should make this impossible
        return gen
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [{
        "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }]}
    # the tokens the grammar left no choice (its punctuation, the rest of a name once it is
    # unambiguous) have a renormalised logprob of exactly 0: they say nothing of the model, and
    # kept they would only dilute a mean; the confidence comes from the name and argument choices
    kept = [i for i, t in enumerate(gen.tokens) if t.logprob != 0.0]
    chosen = [gen.tokens[i] for i in kept]
    extra = dict(gen.extra)
    if "forced_tokens" in extra:  # indexes of the unfiltered tokens: remapped onto the kept ones
        new_index = {old: new for new, old in enumerate(kept)}
        forced = [new_index[i] for i in extra.pop("forced_tokens") if i in new_index]
        if forced:
            extra["forced_tokens"] = forced
    raw = {"object": "chat.completion", "created": int(time.time()), "model": gen.model,
           "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}]}
    return replace(gen, tokens=chosen, finish_reason="tool_calls", raw=raw, extra=extra)
