"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), positive and
negative inputs, at least 200 examples per operation: never a 5xx, and every error body has the
OpenAI shape. A scripted backend answers, so the run is about the server's edge, not a model."""

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
SEEN: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_app(_app()) as base:
        yield base.removesuffix("/v1")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@schema.parametrize()
@hypothesis.settings(
    max_examples=MIN_EXAMPLES + 50,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
    database=None,
)
def test_api_never_5xx_and_errors_are_openai_shaped(case: Any, base_url: str, session: requests.Session) -> None:
    op = f"{case.method} {case.path}"
    SEEN[op] += 1
    response = case.call(base_url=base_url, session=session, timeout=30)
    STATUSES[f"{op} {response.status_code}"] += 1
    assert response.status_code < 500, (op, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str)


def test_every_operation_got_enough_examples() -> None:
    """Runs after the fuzzing above (file order): proves the volume, and that both the happy path
    and the error path were reached for the POST routes."""
    if not SEEN:
        pytest.skip("run together with test_api_never_5xx_and_errors_are_openai_shaped")
    print("\nexamples per operation:", dict(SEEN))
    print("statuses:", dict(sorted(STATUSES.items())))
    spec = _schema_dict()
    with_body = [f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method, op in ops.items()
                 if isinstance(op, dict) and "requestBody" in op]
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= set(with_body)
    for op in with_body:  # operations without inputs have only a handful of distinct requests
        assert SEEN[op] >= MIN_EXAMPLES, (op, SEEN[op])
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert STATUSES[f"{op} 200"] > 0 and sum(v for k, v in STATUSES.items() if k.startswith(op + " 4")) > 0
