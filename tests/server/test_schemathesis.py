"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), positive and
negative inputs, at least 200 examples per operation: never a 5xx, and every error body has the
shape of its API (Anthropic's on /v1/messages*, OpenAI's elsewhere). The same generated bodies are then sent again with one field (a sampling parameter,
the messages, the prompt, an unknown field) replaced by a numeric edge (NaN, Infinity, 1e400,
2**64, a bool, a string) or by deep nesting (100,000 brackets, 50,000 objects): never a 5xx, and
what JSON or the OpenAI API forbids is a 400. A scripted backend answers, so the run is about the
server's edge, not a model."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import hypothesis.strategies as st
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
BODY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens")


def assert_error_shape(path: str, body: Any) -> None:
    """OpenAI's {"error": {message, type, param, code}}, or Anthropic's on /v1/messages*."""
    if path.startswith("/v1/messages"):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and isinstance(body["error"]["message"], str), body
    else:
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str)


def _app() -> Any:
    settings = Settings(max_body_bytes=64_000)
    return create_app(settings, tiers=[Tier("fake", ScriptedBackend("fake", text="fuzzed answer"), None)])


def _schema_dict() -> dict[str, Any]:
    """The app's own schema; `model` narrowed to served ids so positive cases reach the router
    (negative cases still send anything)."""
    raw = copy.deepcopy(_app().openapi())
    for path in BODY_ROUTES:
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["model"] = {"type": "string", "enum": ["fake", "localroute/cascade"]}
    return raw


schema = schemathesis.openapi.from_dict(_schema_dict())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
WITH_BODY = {f"{method.upper()} {path}" for path, ops in _schema_dict()["paths"].items() for method, op in ops.items()
             if isinstance(op, dict) and "requestBody" in op}
ANSWERING = {f"POST {path}" for path in BODY_ROUTES}  # routes that reach the router


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_app(_app()) as base:
        yield base.removesuffix("/v1")


def fuzzing(max_examples: int) -> hypothesis.settings:
    """Repeatable runs (derandomised, no example database), as many examples as asked."""
    return hypothesis.settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))


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
@fuzzing(MIN_EXAMPLES + 50)
def test_api_never_5xx_and_errors_are_openai_shaped(case: Any, base_url: str, session: requests.Session,
                                                     volume: Counter[str]) -> None:
    response = case.call(base_url=base_url, session=session, timeout=30)
    volume[f"{case.operation.label} {response.status_code}"] += 1
    op = f"{case.method} {case.path}"
    assert response.status_code < 500, (op, response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_error_shape(case.path, json.loads(response.text))


# ---------- numeric edges and deep nesting inside generated bodies ----------

MIN_EDGE_EXAMPLES = 150
FIELDS = ["temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs", "logprobs",
          "presence_penalty", "frequency_penalty", "stop", "stream", "messages", "prompt", "logit_bias",
          "response_format", "an_unknown_field"]
# never valid anywhere: not JSON (NaN, Infinity, overflow), or nested past max_json_depth: 400 (413 when
# the nesting is also over max_body_bytes); by name, so hypothesis does not print 200 kB reprs
REFUSED: dict[str, str] = {
    "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "1e400": "1e400", "-1e400": "-1e400",
    "100000 balanced [": "[" * 100_000 + "]" * 100_000, "100000 [": "[" * 100_000,
    "50000 balanced {a:": '{"a":' * 50_000 + "1" + "}" * 50_000, "50000 {a:": '{"a":' * 50_000,
    "65 balanced [": "[" * 65 + "]" * 65,
}
# valid JSON that some fields take and others refuse
MAYBE = {v: v for v in (str(2**64), str(2**63), str(-(2**63) - 1), str(-(2**63)), "-1", "0", "1e-400", "-0.0",
                         "1e308", "true", '"1"', "[]", "{}", "null", "[[[[[[[[1]]]]]]]]")}
EDGES = {**REFUSED, **MAYBE}
EDGE_SEEN: Counter[str] = Counter()
EDGE_STATUSES: Counter[int] = Counter()


def _with_edge(body: Any, field: str, literal: str) -> bytes:
    body = dict(body) if isinstance(body, dict) else {"model": "fake"}
    if field == "messages" and isinstance(body.get("messages"), list) and body["messages"] \
            and isinstance(body["messages"][0], dict):
        body["messages"] = [{**body["messages"][0], "content": "@EDGE@"}, *body["messages"][1:]]
    else:
        body[field] = "@EDGE@"
    return json.dumps(body).replace('"@EDGE@"', literal, 1).encode()


@schema.include(method="POST", path_regex=r"(completions|responses|messages)$").parametrize()
@schema.given(field=st.sampled_from(FIELDS), edge=st.sampled_from(list(EDGES)))
@fuzzing(MIN_EDGE_EXAMPLES + 50)
def test_numeric_edges_and_deep_nesting_never_5xx(case: Any, field: str, edge: str, base_url: str,
                                                   session: requests.Session) -> None:
    op = f"{case.method} {case.path}"
    EDGE_SEEN[op] += 1
    raw = _with_edge(case.body, field, EDGES[edge])
    response = session.post(f"{base_url}{case.path}", data=raw, headers={"content-type": "application/json"},
                            timeout=30)
    EDGE_STATUSES[response.status_code] += 1
    assert response.status_code < 500, (op, field, edge, response.status_code, response.text[:300])
    if edge in REFUSED:
        assert response.status_code in (400, 413), (op, field, edge, response.text[:300])
    if response.status_code >= 400:
        assert_error_shape(case.path, json.loads(response.text))


def test_every_edge_operation_got_enough_examples() -> None:
    """Runs after the edge fuzzing above (file order)."""
    if not EDGE_SEEN:
        pytest.skip("run together with test_numeric_edges_and_deep_nesting_never_5xx")
    print("\nedge examples per operation:", dict(EDGE_SEEN), "statuses:", dict(sorted(EDGE_STATUSES.items())))
    for op in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses", "POST /v1/messages"):
        assert EDGE_SEEN[op] >= MIN_EDGE_EXAMPLES, (op, EDGE_SEEN[op])
    assert EDGE_STATUSES[400] > 0
