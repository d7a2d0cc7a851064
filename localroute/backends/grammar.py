"""Grammar-constrained decoding for `response_format` (json_object, json_schema) in the llama.cpp
engine, through llama.cpp's own grammar sampler.

The schema becomes a GBNF grammar (llama-cpp-python's `LlamaGrammar.from_json_schema`; the generic
JSON grammar for json_object), compiled by `llama_sampler_init_grammar`. At each step the engine
hands the raw logits row to `mask`, which copies it into a preallocated `llama_token_data_array`,
lets the grammar sampler set every token that cannot continue a valid document to -inf, and returns
the masked row; the engine then picks as usual and reports the chosen token to `accept`. Only
requests with a response_format pay for this (one vocabulary-sized copy and a grammar pass per
token); the per-token path of every other request is unchanged.

Reported logprobs of a constrained answer are over the allowed tokens (renormalised), i.e. the
model's confidence among the continuations the grammar permits. `allowed` counts them at the last
step: a token the grammar allowed alone (`allowed == 1`) was forced and carries no evidence, so the
engine lists it in `Generation.extra["forced_tokens"]` and field confidence leaves it out.
"""

from __future__ import annotations

import ctypes
import json
import weakref
from typing import Any

import numpy as np

from localroute.errors import InvalidRequestError

_FORBIDDEN = np.float32(-1e30)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def gbnf_for(response_format: dict[str, Any]) -> str | None:
    """The GBNF grammar for a response_format, or None when none is needed (`text`)."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    from llama_cpp.llama_grammar import JSON_GBNF

    if kind == "json_object":
        return str(JSON_GBNF)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            return str(JSON_GBNF)
        return schema_gbnf(schema, "response_format.json_schema", "response_format")
    raise InvalidRequestError(f"response_format.type {kind!r} is not supported", param="response_format")


def schema_gbnf(schema: dict[str, Any], where: str, param: str) -> str:
    """The GBNF grammar of a JSON schema; a 400 naming `where` when the converter cannot take it."""
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return str(LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)._grammar)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions for unsupported schemas
        raise InvalidRequestError(f"{where}: unsupported schema ({exc})", param=param) from None


class GrammarConstraint:
    """One request's grammar state; used only by the engine thread once created."""

    def __init__(self, ll: Any, vocab: Any, n_vocab: int, eog: np.ndarray, gbnf: str) -> None:
        self._ll = ll
        self._sampler = ll.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise InvalidRequestError("response_format: the grammar did not compile", param="response_format")
        self._finalizer = weakref.finalize(self, ll.llama_sampler_free, self._sampler)
        self._n = n_vocab
        self._eog = eog
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._data["id"] = np.arange(n_vocab, dtype=np.int32)
        self._ptr = ctypes.cast(self._data.ctypes.data, ll.llama_token_data_p)
        self._array = ll.llama_token_data_array(data=self._ptr, size=n_vocab, selected=-1, sorted=False)
        self.allowed = n_vocab  # tokens the grammar allowed at the last `mask`

    def mask(self, row: np.ndarray) -> np.ndarray:
        """The logits row with every token the grammar forbids pushed to -1e30 (probability 0)."""
        data = self._data
        data["id"] = np.arange(self._n, dtype=np.int32)  # a sampler may reorder in place
        data["logit"] = row[: self._n]
        arr = self._array
        arr.data, arr.size, arr.selected, arr.sorted = self._ptr, self._n, -1, False
        self._ll.llama_sampler_apply(self._sampler, ctypes.byref(arr))
        out = np.full(self._n, _FORBIDDEN, dtype=np.float32)  # finite: logprobs stay JSON numbers
        kept = data[: arr.size]
        ok = np.isfinite(kept["logit"])
        out[kept["id"][ok]] = kept["logit"][ok]
        self.allowed = int(ok.sum())
        if not self.allowed:  # nothing may follow: the document is complete, end it
            out[self._eog] = 0.0
        return out

    def accept(self, token: int) -> None:
        self._ll.llama_sampler_accept(self._sampler, int(token))

    def close(self) -> None:
        self._finalizer()


def constraint_for(engine: Any, response_format: dict[str, Any] | None,
                   tools: tuple[dict[str, Any], ...] = (), parallel_calls: bool = False) -> GrammarConstraint | None:
    """A constraint for a LlamaEngine request, or None when the request needs none. `tools`: the
    answer is one call of one of them (backends/tool_calls.py), whatever the response_format;
    with `parallel_calls` one or more calls, one per line."""
    if tools:
        from localroute.backends.tool_calls import call_schema, calls_gbnf

        one = schema_gbnf(call_schema(tools), "tools.function.parameters", "tools")
        try:
            gbnf: str | None = calls_gbnf(one, parallel_calls)
        except ValueError:  # a grammar shape the renaming does not know: one call, as before
            gbnf = one
    elif not response_format:
        return None
    else:
        gbnf = gbnf_for(response_format)
    if gbnf is None:
        return None
    return GrammarConstraint(engine._ll, engine._vocab, engine.n_vocab, engine._eog, gbnf)
