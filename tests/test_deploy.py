"""deploy/ against the code it deploys: every metric (and label) the Grafana dashboard queries is
one a real app's /metrics exports, and the settings in the compose file and the Helm chart's values
are fields of the one settings model. (The files' syntax: deploy/validate.sh, with linters.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from localroute.server.app import create_app
from localroute.settings import REPO_ROOT, Settings, TierSettings, load_settings
from tests.conftest import local_settings, serve_app
from tests.fault_upstream import FaultUpstream

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "localroute.json"
METRIC = re.compile(r"\blocalroute_[a-z0-9_]+")
# labels Prometheus adds at scrape time, or a histogram's own
SCRAPE_LABELS = {"instance", "job", "le"}
# added by issue 20 parts 1-2 (PostgreSQL routing log, Redis shared state) on another branch


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and template variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", ())]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            out.append((f"${var['name']}", var["definition"]))
    return out


def exposition_families(text: str) -> tuple[dict[str, str], dict[str, set[str]], dict[str, set[str]]]:
    """(sample name -> family, family -> label names seen, family -> label values seen as k=v),
    read with prometheus_client's own parser of the text format."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"]}
    names: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = family.name
        labels[family.name] = {k for s in family.samples for k in s.labels}
        values[family.name] = {f"{k}={v}" for s in family.samples for k, v in s.labels.items()}
    return names, labels, values


@pytest.fixture(scope="module")
def metrics_text() -> Iterator[str]:
    """/metrics of the real app after a real escalation: the real SmolLM2 tier (llama.cpp in its own
    process, as `serve` runs it; threshold 0, which a mean logprob never reaches) and the recording
    frontier stand-in on 127.0.0.1."""
    with FaultUpstream() as up:
        settings = local_settings(tiers=[
            {"name": "smollm2-135m", "kind": "llama_cpp", "model": "smollm2-135m", "threshold": 0.0},
            {"name": "frontier", "kind": "openai", "model": "gpt-4o-mini", "base_url": up.url,
             "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}], engine_isolation="process", n_parallel=2)
        with serve_app(create_app(settings)) as url:
            r = httpx.post(f"{url}/chat/completions", timeout=120, json={
                "model": "localroute/cascade", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200 and r.headers["x-localroute-escalated"] == "true", r.text
            yield httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text


@pytest.mark.slow
def test_every_metric_the_dashboard_queries_is_exported(metrics_text: str) -> None:
    names, _, _ = exposition_families(metrics_text)
    queried = {m for _, expr in dashboard_queries() for m in METRIC.findall(expr)}
    assert len(queried) >= 15  # the dashboard covers routing, cost, latency, queues, GPUs
    missing = sorted(queried - set(names))
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    for must in ("localroute_escalations_total", "localroute_cost_usd_total", "localroute_confidence_bucket",
                 "localroute_counterfactual_cost_usd_total", "localroute_e2e_latency_seconds_bucket",
                 "localroute_queue_depth", "localroute_gpu_utilization_ratio", "localroute_gpu_power_watts",
                 "localroute_tokens_total"):
        assert must in queried, f"the dashboard has no panel on {must}"


@pytest.mark.slow
def test_the_labels_the_dashboard_groups_by_exist(metrics_text: str) -> None:
    """Each label a query groups or filters by is on one of its metrics (for the families this
    CPU-only app fills; the GPU ones carry `gpu`, checked against prometheus.py's definition)."""
    names, labels, values = exposition_families(metrics_text)
    labels.setdefault("localroute_gpu_utilization_ratio", set()).add("gpu")
    for family in ("localroute_gpu_power_watts", "localroute_gpu_memory_used_bytes", "localroute_gpu_energy_joules"):
        labels.setdefault(family, set()).add("gpu")
    for title, expr in dashboard_queries():
        families = {names[m] for m in METRIC.findall(expr) if m in names}
        used = set()
        for group in re.findall(r"\b(?:by|ignoring|without|on)\s*\(([^)]*)\)", expr):
            used |= {x.strip() for x in group.split(",") if x.strip()}
        used |= set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!=|!~|=)", expr))
        known = set().union(*(labels[f] for f in families)) if families else set()
        unknown = used - known - SCRAPE_LABELS
        assert not unknown, f"panel {title!r} uses labels {unknown} none of {sorted(families)} has"
    # the HPA and the dashboard's queue panel read the waiting state
    assert "state=waiting" in values["localroute_queue_depth"]


def _settings_fields() -> set[str]:
    return set(Settings.model_fields)


def test_compose_settings_load_and_name_real_fields() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    settings = load_settings(DEPLOY / "compose" / "localroute.toml")
    assert [t.name for t in settings.ladder()] == ["smollm2-135m", "frontier"]
    replicas = [name for name in compose["services"] if name.startswith("localroute-")]
    assert len(replicas) == 2
    for name in replicas:
        env: dict[str, Any] = compose["services"][name]["environment"]
        for var in env:
            if var.startswith("LOCALROUTE_"):
                assert var.removeprefix("LOCALROUTE_").lower() in _settings_fields(), var
        assert env["LOCALROUTE_ROUTING_LOG_URL"].startswith("postgresql://")
        assert env["LOCALROUTE_REDIS_URL"].startswith("redis://")
    targets = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert sorted(targets["static_configs"][0]["targets"]) == [f"{r}:8000" for r in sorted(replicas)]
    assert "/metrics" in settings.public_paths  # Prometheus scrapes without a key


def test_helm_values_config_is_valid_settings() -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "localroute" / "values.yaml").read_text())
    config = dict(values["config"])
    settings = Settings(**config)
    assert [t.kind for t in settings.ladder()] == ["vllm", "openai"]
    for var in ("LOCALROUTE_API_KEYS", "LOCALROUTE_FRONTIER_API_KEY", "LOCALROUTE_ROUTING_LOG_URL",
                "LOCALROUTE_REDIS_URL"):
        assert var.removeprefix("LOCALROUTE_").lower() in _settings_fields()
        assert var in (DEPLOY / "helm" / "localroute" / "templates" / "secret.yaml").read_text()
    frontier: TierSettings = settings.ladder()[-1]
    assert frontier.api_key is None and frontier.api_key_env == "LOCALROUTE_FRONTIER_API_KEY"
    for item in values["env"]:
        assert item["name"].removeprefix("LOCALROUTE_").lower() in _settings_fields()
    assert values["autoscaling"]["metricName"] in (DEPLOY / "helm" / "localroute" / "README.md").read_text()


def test_dashboard_is_provisioned_by_compose() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("../grafana:") for m in mounts)
    provider = yaml.safe_load((DEPLOY / "compose" / "grafana" / "provisioning" / "dashboards" /
                               "localroute.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert any(m.split(":")[1] == path for m in mounts if m.startswith("../grafana:"))
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"] if "targets" in p)


def test_deploy_paths_exist() -> None:
    for rel in ("Dockerfile.cpu", "validate.sh", "helm/localroute/Chart.yaml", "compose/nginx.conf"):
        assert (DEPLOY / rel).is_file(), rel
    assert Path(DEPLOY / "helm" / "localroute" / "templates" / "hpa.yaml").read_text().count("HorizontalPodAutoscaler")


def test_a_tier_key_from_the_secret_reaches_the_frontier(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's frontier tier names its key's variable (api_key_env), filled from the Secret:
    the key is sent as the bearer token, and a missing variable stops start-up naming it."""
    import asyncio

    from localroute.backends.openai_http import from_settings
    from localroute.errors import ConfigError
    from localroute.types import GenerationRequest

    values = yaml.safe_load((DEPLOY / "helm" / "localroute" / "values.yaml").read_text())
    with FaultUpstream() as up:
        config = {**values["config"], "backend": None}
        config["tiers"] = [{**t, "base_url": up.url} if t["kind"] == "openai" else t for t in config["tiers"]]
        settings = Settings(**config)
        tier = settings.ladder()[-1]
        monkeypatch.delenv("LOCALROUTE_FRONTIER_API_KEY", raising=False)
        with pytest.raises(ConfigError, match="LOCALROUTE_FRONTIER_API_KEY is not set"):
            from_settings(tier, settings)
        monkeypatch.setenv("LOCALROUTE_FRONTIER_API_KEY", "sk-from-the-secret")
        backend = from_settings(tier, settings)

        async def ask() -> None:
            try:
                await backend.generate(GenerationRequest(messages=({"role": "user", "content": "hi"},)))
            finally:
                await backend.aclose()

        asyncio.run(ask())
    assert up.requests[0]["headers"]["authorization"] == "Bearer sk-from-the-secret"


def test_deploy_yaml_lints_and_the_compose_file_matches_the_compose_spec() -> None:
    """The part of deploy/validate.sh that needs only Python packages of the dev extra (helm,
    docker-compose, hadolint and kubernetes-validate run there when installed)."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    yamls = [DEPLOY / "compose", DEPLOY / "helm" / "localroute" / "Chart.yaml",
             DEPLOY / "helm" / "localroute" / "values.yaml"]
    lint = subprocess.run([sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"),
                           *map(str, yamls)], check=False, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    spec = subprocess.run([str(bin_dir / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(DEPLOY / "compose" / "docker-compose.yml")], check=False, capture_output=True, text=True,
                          timeout=120)
    assert spec.returncode == 0, spec.stdout + spec.stderr
