"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), positive and
negative inputs, at least 200 examples per operation: never a 5xx, and every error body has the
OpenAI shape. A scripted backend answers, so the run is about the server's edge, not a model.
Each operation's run checks its own volume when it ends (the `volume` fixture), so any subset of
the tests can run alone."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.generation import GenerationMode

from localroute.routing.base import Tier
from localroute.server.app import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend

MIN_EXAMPLES = 200
ERROR_KEYS = {"message", "type", "param", "code"}


def _app() -> Any:
    settings = Settings(max_body_bytes=64_000)
    return create_app(settings, tiers=[Tier("fake", ScriptedBackend("fake", text="fuzzed answer"), None)])


def _schema_dict() -> dict[str, Any]:
    """The app's own schema; `model` narrowed to served ids so positive cases reach the router
    (negative cases still send anything)."""
    raw = copy.deepcopy(_app().openapi())
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["model"] = {"type": "string", "enum": ["fake", "localroute/cascade"]}
    return raw


schema = schemathesis.openapi.from_dict(_schema_dict())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
WITH_BODY = {f"{method.upper()} {path}" for path, ops in _schema_dict()["paths"].items() for method, op in ops.items()
             if isinstance(op, dict) and "requestBody" in op}
ANSWERING = {"POST /v1/chat/completions", "POST /v1/completions"}  # routes that reach the router


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_app(_app()) as base:
        yield base.removesuffix("/v1")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture()
def volume() -> Iterator[Counter[str]]:
    """What one operation's fuzzing sent and got back, checked once all its examples have run (a
    function-scoped fixture lives for the whole Hypothesis run of one test item): enough examples
    for an operation with a body, and both the happy and the error path for the answering routes."""
    seen: Counter[str] = Counter()
    yield seen
    (op,) = {key.rsplit(" ", 1)[0] for key in seen}  # one item fuzzes one operation
    examples = sum(seen.values())
    print(f"\n{op}: {examples} examples, statuses {dict(sorted(seen.items()))}")
    assert examples >= (MIN_EXAMPLES if op in WITH_BODY else 1), (op, examples)
    if op in ANSWERING:
        assert seen[f"{op} 200"] > 0, seen
        assert sum(n for key, n in seen.items() if key.startswith(f"{op} 4")) > 0, seen


def test_every_operation_with_a_body_is_fuzzed() -> None:
    """schemathesis sees every operation with a body (each then gets its own item and volume check)."""
    assert ANSWERING <= WITH_BODY
    for label in WITH_BODY:
        method, path = label.split(" ", 1)
        assert schema[path][method].label == label


@schema.parametrize()
@hypothesis.settings(
    max_examples=MIN_EXAMPLES + 50,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
    database=None,
)
def test_api_never_5xx_and_errors_are_openai_shaped(case: Any, base_url: str, session: requests.Session,
                                                     volume: Counter[str]) -> None:
    response = case.call(base_url=base_url, session=session, timeout=30)
    volume[f"{case.operation.label} {response.status_code}"] += 1
    op = f"{case.method} {case.path}"
    assert response.status_code < 500, (op, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str)
