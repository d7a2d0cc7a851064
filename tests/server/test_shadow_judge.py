"""The LLM judge wired in `serve` (issue 19): with `shadow_judge_tier` naming the frontier, a
category that names no scorer (the default one here) is judged by a second call to that endpoint
with the fixed prompt, while a category with its own scorer is not; a category asking for the judge
with none configured is a clear ConfigError at start-up."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from localroute.errors import ConfigError
from localroute.monitoring.shadow import JUDGE_SYSTEM
from localroute.routing import Tier
from localroute.server import create_app
from localroute.server.live_quality import scorer_of
from localroute.settings import CategorySettings, Settings, TierSettings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import Fault, FaultUpstream


def settings(url: str, **kw: Any) -> Settings:
    frontier = TierSettings(name="frontier", kind="openai", model="gold", base_url=url, input_usd_per_mtok=1.0,
                            output_usd_per_mtok=1.0)
    return Settings(tiers=[TierSettings(name="local", kind="llama_cpp", model="local"), frontier],
                    shadow_sample_rate=1.0, frontier_max_retries=0,
                    **{"categories": {"sentiment": CategorySettings(scorer="choice", choices=["agree", "other"])},
                       **kw})


def tiers() -> list[Tier]:
    return [Tier("local", ScriptedBackend("local", "agree", [-0.1]), -100.0),
            Tier("frontier", ScriptedBackend("frontier", "agree", [-0.01], local=False), None)]


def app_for(s: Settings) -> Any:
    return create_app(s, tiers=tiers())


def test_free_text_is_judged_by_the_frontier_and_scored_categories_are_not() -> None:
    with FaultUpstream(Fault(text="agree")) as up:
        app = app_for(settings(up.url, shadow_judge_tier="frontier"))
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            for category in ("default", "sentiment"):
                r = client.post("/chat/completions", json={
                    "model": "localroute/cascade", "max_tokens": 4, "metadata": {"localroute_category": category},
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say agree."}]})
                assert r.status_code == 200
            shadow = app.state.live_quality.shadow
            deadline = time.monotonic() + 10
            while shadow.stats["scored"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert shadow.stats["scored"] == 2
        judged = [q for q in up.requests if q["json"]["messages"][0]["content"] == JUDGE_SYSTEM]
        assert len(up.requests) == 3 and len(judged) == 1  # two shadow calls, one judge call (the default's)
        # the conversation as the client sent it, system prompt included, then the local answer as A
        assert judged[0]["json"]["messages"][1]["content"].startswith(
            "Conversation:\n<<<\n[system]\nBe brief.\n\n[user]\nSay agree.\n>>>\n\nBoth answers reply to the "
            "conversation's last turn.\n\nAnswer A:\n<<<\nagree\n>>>")


def test_scorer_of_and_a_judge_category_without_a_judge() -> None:
    s = Settings(categories={"chat": CategorySettings(), "exact": CategorySettings(scorer="exact"),
                             "free": CategorySettings(scorer="judge")})
    assert [scorer_of(s, c, True) for c in ("chat", "exact", "free", "default")] == ["judge", "exact", "judge",
                                                                                      "judge"]
    assert [scorer_of(s, c, False) for c in ("chat", "exact", "default")] == ["exact", "exact", "exact"]
    from localroute.server.live_quality import LiveQualityRuntime
    from localroute.service import Service

    bad = settings("http://127.0.0.1:9/v1", categories={"free": CategorySettings(scorer="judge")})
    with pytest.raises(ConfigError, match="categories free use scorer 'judge' but no judge is configured"):
        LiveQualityRuntime(Service(bad, tiers()))._judge(None)
    local = settings("http://127.0.0.1:9/v1", shadow_judge_tier="local")
    with pytest.raises(ConfigError, match="must be an OpenAI-compatible endpoint"):
        LiveQualityRuntime(Service(local, tiers()))._judge(None)
