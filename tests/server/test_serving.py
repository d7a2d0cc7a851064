"""Category plumbing at the HTTP edge (serving.py), with scripted tiers behind a real uvicorn
server: where the category comes from, where it shows, and a bad one as a 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localroute.monitoring.record import RequestRecord
from localroute.routing import Tier
from localroute.server import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[httpx.Client, list[RequestRecord], ScriptedBackend]]:
    records: list[RequestRecord] = []
    local = ScriptedBackend("local", "positive", [-0.5])
    frontier = ScriptedBackend("frontier", "the frontier", [-0.01], local=False)
    tiers = [Tier("local", local, -1.0, category_thresholds={"strict": -0.1}), Tier("frontier", frontier, None)]
    settings = Settings(routing_log_path=tmp_path / "routing.db",
                        categories={"classify": {"system_prompt_pattern": "(?i)classify"}})
    with serve_app(create_app(settings, tiers=tiers, observers=[records.append])) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        yield client, records, frontier


def chat(client: httpx.Client, model: str = "localroute/cascade", system: str | None = None,
         **extra: object) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
    return client.post("/chat/completions", json={"model": model, "messages": messages, **extra})


def _category(evidence: dict[str, Any]) -> dict[str, Any]:
    """The category part of a decision's evidence (the rest, e.g. signal_used, is other tests')."""
    return {k: v for k, v in evidence.items() if k.startswith("category")}


def test_category_in_the_answer_the_header_and_the_record(served: tuple[httpx.Client, list[RequestRecord],
                                                                       ScriptedBackend]) -> None:
    client, records, _ = served
    r = chat(client, metadata={"localroute_category": "billing"})
    assert r.status_code == 200
    assert _category(r.json()["localroute"]["evidence"]) == {"category": "billing", "category_source": "client"}
    assert r.headers["x-localroute-category"] == "billing"
    r = chat(client, system="Classify the ticket")
    assert r.json()["localroute"]["evidence"]["category"] == "classify"
    assert _category(chat(client).json()["localroute"]["evidence"]) == {"category": "default",
                                                                        "category_source": "default"}
    assert [rec.decision.evidence["category"] for rec in records if rec.decision] == ["billing", "classify",
                                                                                       "default"]


def test_a_model_alias_names_the_category_and_its_threshold_applies(
        served: tuple[httpx.Client, list[RequestRecord], ScriptedBackend]) -> None:
    client, _, _ = served
    r = chat(client, model="localroute/cascade:strict")
    body = r.json()
    assert r.status_code == 200 and body["model"] == "localroute/cascade:strict"
    assert body["localroute"]["evidence"]["category"] == "strict"
    assert body["localroute"]["attempts"][0]["threshold"] == -0.1 and body["localroute"]["tier"] == "frontier"
    r = chat(client, model="localroute/cascade:strict", stream=True)
    assert r.status_code == 200 and r.headers["x-localroute-category"] == "strict"


def test_a_bad_category_is_a_400_naming_the_field(
        served: tuple[httpx.Client, list[RequestRecord], ScriptedBackend]) -> None:
    client, _, _ = served
    r = chat(client, metadata={"localroute_category": "no spaces allowed"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "metadata.localroute_category"
    assert chat(client, model="localroute/cascade:bad name").status_code in (400, 404)
