"""Over HTTP with the real SmolLM2 tier: the decision says which signal label_confidence read (the
label's score for a request naming labels, mean_logprob for one that names none), in the answer's
`localroute` block and in the routing log's evidence."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from localroute.backends.llama_cpp import LlamaCppBackend, LlamaEngine
from localroute.routing import Tier
from localroute.server import create_app
from localroute.settings import Settings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend

pytestmark = pytest.mark.slow

SYSTEM = "Reply with the answer alone, written exactly as one of the options the user gives. No explanation."


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    engine = LlamaEngine(smollm2_path, n_ctx_seq=512, n_parallel=2, n_threads=2)
    log_path = tmp_path_factory.mktemp("log") / "routing.db"
    tiers = [Tier("local", LlamaCppBackend("local", engine), -1e9),
             Tier("frontier", ScriptedBackend("frontier", "the frontier", [-0.01], local=False), None)]
    settings = Settings(routing_log_path=log_path, confidence_aggregator="label_confidence")
    try:
        with serve_app(create_app(settings, tiers=tiers)) as url, httpx.Client(base_url=url, timeout=120) as client:
            yield client, log_path
    finally:
        engine.close()


def _chat(client: httpx.Client, **extra: object) -> dict[str, object]:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the sentiment of: I love this phone! Options: negative, neutral, positive."}]
    r = client.post("/chat/completions", json={"model": "localroute/cascade", "messages": messages, "max_tokens": 30,
                                               "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_signal_used_for_a_label_request_and_a_plain_one(served: tuple[httpx.Client, Path]) -> None:
    client, log_path = served
    body = _chat(client, metadata={"labels": "negative|neutral|positive"})
    labelled = body["localroute"]
    plain = _chat(client)["localroute"]
    assert "label" in labelled["evidence"], json.dumps(labelled["evidence"])
    assert labelled["evidence"]["label"]["local"]["chosen"] in ("negative", "neutral", "positive")
    assert labelled["evidence"]["signal_used"] == {"local": {"signal": "label_confidence"}}
    used = plain["evidence"]["signal_used"]["local"]
    assert used["signal"] == "mean_logprob" and "no label" in used["why"]
    logged: list[object] = []
    for _ in range(100):  # the routing log is written behind the answers
        with sqlite3.connect(log_path) as db:
            logged = [json.loads(row[0])["signal_used"] for row in db.execute("SELECT evidence FROM requests")]
        if len(logged) >= 2:
            break
        time.sleep(0.1)
    assert logged == [labelled["evidence"]["signal_used"], plain["evidence"]["signal_used"]]
