"""Two real `localroute serve` processes against one PostgreSQL and one Redis (throwaway servers
from tests/services.py), the frontier the recording stand-in of tests/fault_upstream.py. The
ladder is the frontier alone: no local model is loaded, because the local tier plays no part in
shared state (every request is a frontier call that reserves budget and counts against limits).

Replica A is `fail_open`, replica B `fail_closed`, so one Redis outage shows both policies. The
scenarios run in order on one cluster (starting it costs most of the time):
budget across both and remembered over a restart; feedback across replicas and `report` on
either; a per-key limit across both; PostgreSQL stopped under load; kill -9 of a replica; Redis
paused and then killed under load, and its return."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from localroute.settings import REPO_ROOT
from tests.fault_upstream import Fault, FaultUpstream
from tests.services import PostgresServer, RedisServer, free_port, postgres_server, redis_server

pytestmark = pytest.mark.slow

KEYS = {name: f"sk-test-{name}-0123456789" for name in ("budget", "rate", "load", "feedback")}
RATE_PER_MIN = 5
PRICE = 1000.0  # USD per million tokens, prompt and completion: 0.001 a token
MAX_TOKENS = 8
# the stand-in reports 10 + 5 tokens: 0.015 a call; a call's worst case is (1 + 16 + 8) tokens = 0.025
ACTUAL_USD, WORST_USD = 0.015, 0.025


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class Replica:
    name: str
    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("LOCALROUTE_ROUTING_LOG_PATH", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "localroute", "serve", "--config", str(self.config)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"replica {self.name} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()  # type: ignore[no-any-return]


@dataclass
class Cluster:
    redis: RedisServer
    pg: PostgresServer
    upstream: FaultUpstream
    dir: Path
    a: Replica
    b: Replica
    replicas: list[Replica] = field(default_factory=list)

    def write_configs(self, budget_usd: float) -> None:
        for r, policy in ((self.a, "fail_open"), (self.b, "fail_closed")):
            r.config.write_text(config_toml(self, r, policy, budget_usd))

    def restart(self, budget_usd: float) -> None:
        for r in (self.a, self.b):
            r.stop()
        self.write_configs(budget_usd)
        for r in (self.a, self.b):
            r.start()


def config_toml(c: Cluster, r: Replica, policy: str, budget_usd: float) -> str:
    tier = {
        "name": "frontier",
        "kind": "openai",
        "model": "gpt-test",
        "base_url": c.upstream.url,
        "input_usd_per_mtok": PRICE,
        "output_usd_per_mtok": PRICE,
    }
    return "\n".join(
        [
            f"port = {r.port}",
            'log_level = "warning"',
            f"api_keys = {json.dumps(','.join(KEYS.values()))}",
            f"redis_url = {json.dumps(c.redis.url)}",
            f'shared_state_failure = "{policy}"',
            "shared_state_timeout_s = 0.5",  # 2 shared cores: an event loop under 25 requests lags
            "shared_state_retry_s = 0.5",
            f"routing_log_url = {json.dumps(c.pg.url)}",
            f"routing_log_spill_path = {json.dumps(str(c.dir / f'{r.name}-spill.jsonl'))}",
            "routing_log_batch_s = 0.02",
            f"budget_usd = {budget_usd}",
            'budget_exhausted_policy = "reject"',
            "budget_hold_ttl_s = 3.0",
            "frontier_timeout_s = 2.0",
            "frontier_max_retries = 0",
            'engine_isolation = "thread"',
            "[rate_limit_default]",
            "requests_per_min = 100000",
            "[rate_limits." + key_id(KEYS["rate"]) + "]",
            f"requests_per_min = {RATE_PER_MIN}",
            "[[tiers]]",
            *[f"{k} = {json.dumps(v)}" for k, v in tier.items()],
            "",
        ]
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("replicas")
    with (
        redis_server() as redis,
        postgres_server() as pg,
        FaultUpstream(Fault(prompt_tokens=10, completion_tokens=5, delay_s=0.02)) as up,
    ):
        a = Replica("a", d / "a.toml", free_port(), d / "a.log")
        b = Replica("b", d / "b.toml", free_port(), d / "b.log")
        c = Cluster(redis, pg, up, d, a, b)
        c.write_configs(budget_usd=0.3)
        try:
            a.start()
            b.start()
            yield c
        finally:
            a.stop()
            b.stop()


def ask(base: str, key: str, timeout: float = 10.0) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        timeout=timeout,
        headers={"Authorization": f"Bearer {KEYS[key]}"},
        json={
            "model": "localroute/cascade",
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "q"}],
        },
    )


def spread(c: Cluster, key: str, n: int, workers: int = 25) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: ask((c.a if i % 2 else c.b).url, key), range(n)))


def test_budget_holds_across_replicas_and_restarts(cluster: Cluster) -> None:
    c = cluster
    calls_before = len(c.upstream.requests)
    answers = spread(c, "budget", 50)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == 50, [r.text for r in answers if r.status_code not in (200, 429)]
    assert all(
        r.json()["error"]["code"] == "budget_exceeded" and int(r.headers["retry-after"]) >= 1 for r in refused
    )
    assert {r.headers["x-localroute-tier"] for r in ok} == {"frontier"}
    assert len(c.upstream.requests) - calls_before == len(ok)
    for _ in range(20):  # settles run just after each answer, off the request path
        spent = c.a.health()["budget"]["spent_usd"]
        if spent == pytest.approx(len(ok) * ACTUAL_USD):
            break
        time.sleep(0.05)
    assert spent == pytest.approx(len(ok) * ACTUAL_USD)
    assert spent <= 0.3 + WORST_USD  # past the cap by at most one reservation
    assert len(ok) >= int(0.3 / WORST_USD)  # and the cap was used: at least cap / worst case granted
    assert c.b.health()["budget"]["spent_usd"] == spent  # both see one budget
    c.restart(budget_usd=100.0)  # both restarted (the operator raised the cap): the spend is remembered
    assert c.a.health()["budget"]["spent_usd"] == spent and c.b.health()["budget"]["spent_usd"] == spent


def test_feedback_posted_to_the_other_replica_and_report_on_either(cluster: Cluster) -> None:
    c = cluster
    answer = ask(c.a.url, "feedback")
    assert answer.status_code == 200
    fb = httpx.post(
        f"{c.b.url}/v1/feedback",
        timeout=10,
        headers={"Authorization": f"Bearer {KEYS['feedback']}"},
        json={"request_id": answer.json()["id"], "correct": True},
    )
    assert fb.status_code == 200, fb.text
    assert fb.json()["tier"] == "frontier"
    import psycopg

    with psycopg.connect(c.pg.url) as conn:
        logged = conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        stored = conn.execute(
            "SELECT COUNT(*) FROM feedback WHERE request_id = %s", (answer.json()["id"],)
        ).fetchone()
    assert stored[0] == 1
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOCALROUTE_ROUTING_LOG_PATH", None)
    for r in (c.a, c.b):  # `report` with either replica's settings sees every row of both
        out = subprocess.run(
            [sys.executable, "-m", "localroute", "report", "--config", str(r.config), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=True,
        )
        summary = json.loads(out.stdout)
        assert summary["requests"] == logged and logged >= 51


def test_rate_limit_per_key_across_replicas(cluster: Cluster) -> None:
    answers = spread(cluster, "rate", 12, workers=12)
    ok = [r for r in answers if r.status_code == 200]
    limited = [r for r in answers if r.status_code == 429]
    assert len(ok) == RATE_PER_MIN and len(limited) == 12 - RATE_PER_MIN
    for r in limited:
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"]
        assert 1 <= int(r.headers["retry-after"]) <= 60


def test_postgres_stopped_under_load_loses_no_row(cluster: Cluster) -> None:
    c = cluster
    ids: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            r = ask((c.a if i % 2 else c.b).url, "load")
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
            i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    c.pg.stop()
    time.sleep(2.0)
    during = len(ids)
    c.pg.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert during >= 10 and len(ids) > during  # served while the log's database was down
    import psycopg

    deadline = time.monotonic() + 15
    stored = 0
    while time.monotonic() < deadline:
        with psycopg.connect(c.pg.url) as conn:
            stored = conn.execute(
                "SELECT COUNT(*) FROM requests WHERE request_id = ANY(%s)", (ids,)
            ).fetchone()[0]
        if stored == len(ids):
            break
        time.sleep(0.3)
    assert stored == len(ids)  # every row: spilled while down, replayed when back; none twice
    spilled = sum(1 for r in (c.a, c.b) if "rows spilled" in r.log.read_text())
    assert spilled >= 1


def test_kill_9_of_one_replica(cluster: Cluster) -> None:
    c = cluster
    c.upstream.default = Fault(prompt_tokens=10, completion_tokens=5, delay_s=1.0)
    try:
        with ThreadPoolExecutor(12) as pool:
            on_a = [pool.submit(ask, c.a.url, "load") for _ in range(6)]
            on_b = [pool.submit(ask, c.b.url, "load") for _ in range(6)]
            time.sleep(0.5)
            c.a.kill()
            b_answers = [f.result() for f in on_b]
            for f in on_a:
                with pytest.raises(httpx.HTTPError):
                    f.result()
        assert [r.status_code for r in b_answers] == [200] * 6  # the other keeps serving
        for _ in range(20):  # B settles off the request path: wait for its own holds to go
            held = c.b.health()["budget"]["reserved_usd"]
            if held <= 6 * WORST_USD + 1e-9:
                break
            time.sleep(0.05)
        assert held == pytest.approx(6 * WORST_USD)  # the dead replica's holds, still counted
        time.sleep(3.2)  # budget_hold_ttl_s
        assert c.b.health()["budget"]["reserved_usd"] == 0.0  # expired
    finally:
        c.upstream.default = Fault(prompt_tokens=10, completion_tokens=5, delay_s=0.02)
    assert ask(c.b.url, "load").status_code == 200
    c.a.start()


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_redis_paused_then_killed_fail_open_serves_fail_closed_refuses(cluster: Cluster) -> None:
    c = cluster
    results: dict[str, list[tuple[int, float, httpx.Response]]] = {"a": [], "b": []}
    stop = threading.Event()

    def load(r: Replica) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            resp = ask(r.url, "load", timeout=10)
            results[r.name].append((resp.status_code, time.perf_counter() - t, resp))

    threads = [threading.Thread(target=load, args=(r,)) for r in (c.a, c.b) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    c.redis.pause(1500)  # every Redis command waits 1.5 s
    time.sleep(1.5)
    c.redis.kill()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    a, b = results["a"], results["b"]
    assert a and all(code == 200 for code, _, _ in a), {code for code, _, _ in a}
    latencies = [s for _, s, _ in a]
    p99 = _p(latencies, 0.99)
    print(
        f"fail_open under Redis pause+kill: {len(a)} answered, p50 {_p(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )
    assert p99 < 2.0  # within the request's deadline (frontier_timeout_s): Redis cost at most its timeout
    assert any("local" in r.headers.get("x-localroute-shared-state", "") for _, _, r in a)
    metrics = httpx.get(
        f"{c.a.url}/metrics", timeout=5, headers={"Authorization": f"Bearer {KEYS['load']}"}
    ).text
    assert "localroute_shared_state_fallbacks_total" in metrics
    refused = [r for code, _, r in b if code == 503]
    assert refused and all(code in (200, 503) for code, _, _ in b)
    for r in refused:
        assert r.json()["error"]["code"] == "shared_state_unavailable" and int(r.headers["retry-after"]) >= 1
    assert max(s for _, s, _ in b) < 2.0  # refused promptly, not hung
    c.redis.start()  # recovery: both back on shared state
    time.sleep(0.7)  # shared_state_retry_s
    for r in (c.a, c.b):
        resp = ask(r.url, "load")
        assert resp.status_code == 200 and "x-localroute-shared-state" not in resp.headers
