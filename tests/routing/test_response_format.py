"""response_format with the real SmolLM2 engine: grammar-constrained JSON, and answers that break
the format escalating whatever their confidence."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.errors import InvalidRequestError
from localroute.routing.base import Tier
from localroute.routing.cascade import CascadeRouter
from localroute.routing.response_format import schema_violation
from localroute.types import GenerationRequest, SamplingParams

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend("smollm2", LlamaEngine(smollm2_path, n_ctx_seq=512, n_parallel=2, n_threads=2))
    yield backend
    asyncio.run(backend.aclose())


def _req(fmt: dict[str, Any] | None, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": "Describe a person called Ann, aged 31, as JSON."},),
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, response_format=fmt),
    )


def test_json_schema_output_parses_and_validates(smol: LlamaCppBackend) -> None:
    gen = asyncio.run(smol.generate(_req(SCHEMA_FORMAT, 48)))
    value = json.loads(gen.text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert schema_violation(SCHEMA_FORMAT, gen.text) is None
    assert all(t.logprob > -1e6 for t in gen.tokens)  # forbidden tokens are never picked


def test_json_object_output_is_an_object(smol: LlamaCppBackend) -> None:
    # a request SmolLM2 answers in a few tokens: the grammar only lets it stop once the object is closed
    request = GenerationRequest(
        messages=({"role": "user", "content": "Give me a JSON object with keys name and age."},),
        params=SamplingParams(max_tokens=64, temperature=0.0, response_format={"type": "json_object"}),
    )
    gen = asyncio.run(smol.generate(request))
    assert gen.finish_reason == "stop", gen.text
    value = json.loads(gen.text)
    assert isinstance(value, dict) and value, gen.text
    # an answer cut by the length limit (the person prompt runs on) is still an object's start
    cut = asyncio.run(smol.generate(_req({"type": "json_object"}, 160)))
    assert cut.text.lstrip().startswith("{")


def test_unconstrained_request_is_unchanged(smol: LlamaCppBackend) -> None:
    """Without response_format the engine does not constrain: SmolLM2 wraps its JSON in prose/fences."""
    gen = asyncio.run(smol.generate(_req(None, 48)))
    assert schema_violation(SCHEMA_FORMAT, gen.text) is not None


def test_invalid_json_answer_escalates_whatever_its_confidence(smol: LlamaCppBackend) -> None:
    # the cheap tier accepts any confidence; a 3-token budget cuts the JSON short -> unparsable
    tiers = [Tier("cheap", smol, threshold=-1e9), Tier("strong", smol, None)]
    cascade = CascadeRouter(tiers)
    short = asyncio.run(cascade.route(_req(SCHEMA_FORMAT, 3)))
    assert short.decision.escalated and short.decision.answered_by == "strong"
    assert short.decision.attempts[0].accepted is False
    assert "not valid JSON" in short.decision.evidence["schema_violations"]["cheap"]
    full = asyncio.run(cascade.route(_req(SCHEMA_FORMAT, 48)))
    assert not full.decision.escalated and full.decision.answered_by == "cheap"


def test_schema_violation_details() -> None:
    assert schema_violation({"type": "json_object"}, "[1, 2]") == "JSON is not an object"
    assert "age" in (schema_violation(SCHEMA_FORMAT, '{"name": "A", "age": "x"}') or "")
    assert schema_violation(SCHEMA_FORMAT, '{"name": "A"}') is not None
    assert schema_violation({"type": "text"}, "anything") is None


def test_unsupported_response_format_is_a_400(smol: LlamaCppBackend) -> None:
    with pytest.raises(InvalidRequestError):
        asyncio.run(smol.generate(_req({"type": "yaml"}, 8)))
