#!/usr/bin/env python3
"""Bounded soak: a real `localroute serve` (SmolLM2 -> a fault-injecting frontier) under load with
random client disconnects, random frontier faults and N random `kill -9` of the server (each
followed by a restart). Prints requests sent / answered / failed, 5xx count, routing-log rows
lost (completed responses without a row), the log's integrity_check, and server RSS growth.

    .venv/bin/python scripts/soak.py --requests 300 --duration-s 120 --kills 2

Bounded by both --requests and --duration-s (whichever comes first). Exits 1 when a 5xx was
seen, a completed response's row is missing, or the log fails integrity_check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fault_upstream import Fault, FaultUpstream  # the same upstream the tests use

PROMPTS = [
    "Is this review positive or negative? 'The battery died after a day.'",
    "Extract the city from: 'Ship to 12 Rue de Rivoli, Paris.'",
    "Summarise in five words: the meeting moved to Tuesday at noon.",
    "What is 17 plus 25?",
    "Name a primary colour.",
    "Translate 'good morning' to French.",
]


def random_fault(rng: random.Random) -> Fault:
    """The frontier's behaviour for one call: mostly fine, sometimes each kind of failure."""
    roll = rng.random()
    if roll < 0.50:
        return Fault()
    if roll < 0.62:
        return Fault("status", status=rng.choice([500, 502, 503]))
    if roll < 0.67:
        return Fault("status", status=429, headers={"Retry-After": "1"})
    if roll < 0.77:
        return Fault("garbage")
    if roll < 0.87:
        return Fault("cut", cut_after=rng.randint(0, 3))
    if roll < 0.93:
        return Fault("stall", cut_after=rng.randint(0, 2), keepalive_every_s=0.2)
    return Fault(delay_s=rng.uniform(0.1, 1.0))


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    answered_ids: list[str] = field(default_factory=list)

    def add(self, key: str, request_id: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if request_id:
                self.answered_ids.append(request_id)


class Server:
    """`localroute serve` as a child process that can be killed with SIGKILL and restarted."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss_mb: list[tuple[float, float]] = []  # (start, end) per incarnation
        self.down = threading.Event()

    def start(self) -> None:
        cli = str(Path(sys.executable).parent / "localroute")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([cli, "serve", "--config", str(self.config), "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    self.rss_mb.append((self.rss(), self.rss()))
                    self.down.clear()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def rss(self) -> float:
        if self.proc is None:
            return 0.0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def sample(self) -> None:
        if self.rss_mb and not self.down.is_set():
            rss = self.rss()
            if rss:
                self.rss_mb[-1] = (self.rss_mb[-1][0], rss)

    def kill9(self) -> None:
        assert self.proc is not None
        self.sample()
        self.down.set()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one_request(client: httpx.Client, base: str, rng: random.Random, tally: Tally, disconnect_rate: float,
                server: Server) -> None:
    kind = rng.choices(["chat", "stream", "completion"], weights=[6, 3, 1])[0]
    leave = rng.random() < disconnect_rate
    prompt = rng.choice(PROMPTS)
    body: dict[str, Any] = {"model": "localroute/cascade", "max_tokens": rng.randint(4, 24), "temperature": 0.7,
                            "seed": rng.randint(0, 1000)}
    if kind == "completion":
        url, body["prompt"] = f"{base}/completions", prompt
    else:
        url, body["messages"] = f"{base}/chat/completions", [{"role": "user", "content": prompt}]
        body["stream"] = kind == "stream"
    tally.add("sent")
    try:
        if kind == "stream":
            with client.stream("POST", url, json=body, timeout=60) as r:
                if r.status_code != 200:
                    r.read()
                    _status(tally, r.status_code)
                    return
                events = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        if leave and len(events) >= 2:
                            tally.add("disconnected_by_client")
                            return
                if events and events[-1] == "[DONE]":
                    tally.add("answered", json.loads(events[0])["id"])
                else:
                    tally.add("failed_stream_error_event")
        else:
            timeout = httpx.Timeout(60, read=rng.uniform(0.05, 0.4)) if leave else 60
            r = client.post(url, json=body, timeout=timeout)
            if r.status_code == 200:
                tally.add("answered", r.json()["id"])
            else:
                _status(tally, r.status_code)
    except httpx.TimeoutException:
        tally.add("disconnected_by_client" if leave else "failed_timeout")
    except httpx.HTTPError:
        tally.add("failed_server_killed" if server.down.is_set() or _recently_killed(server) else "failed_connection")


def _recently_killed(server: Server) -> bool:
    return server.proc is None or server.proc.poll() is not None


def _status(tally: Tally, status: int) -> None:
    if status >= 500:
        tally.add("http_5xx")
    elif status == 429:
        tally.add("rejected_429")
    else:
        tally.add(f"failed_{status}")


def rows_lost(db: Path, answered: list[str]) -> dict[str, Any]:
    if not db.exists():
        return {"routing_log": "absent", "rows_lost": None, "integrity_check": None, "rows": 0}
    with sqlite3.connect(db) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        logged = {rid for (rid,) in conn.execute("SELECT request_id FROM requests")}
    lost = [rid for rid in answered if rid not in logged]
    return {"routing_log": str(db), "rows": len(logged), "rows_lost": len(lost), "integrity_check": integrity,
            "lost_examples": lost[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="stop after this many requests")
    ap.add_argument("--duration-s", type=float, default=120.0, help="stop after this many seconds")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--kills", type=int, default=2, help="random kill -9 of the server (each restarted)")
    ap.add_argument("--disconnect-rate", type=float, default=0.1, help="share of clients that leave early")
    ap.add_argument("--threshold", type=float, default=-0.9, help="SmolLM2 escalation threshold (mean logprob)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="localroute-soak-"))
    db = work / "routing.db"
    tally = Tally()
    with FaultUpstream() as upstream:
        fault_rng = random.Random(args.seed + 1)
        upstream.chooser = lambda: random_fault(fault_rng)
        config = work / "soak.toml"
        config.write_text(
            f'models_dir = "{REPO / "models"}"\nn_ctx = 512\nn_parallel = 4\nn_threads = 2\nmax_queue = 32\n'
            f'routing_log_path = "{db}"\nlog_level = "warning"\n'
            f"frontier_timeout_s = 6.0\nfrontier_first_token_timeout_s = 2.0\nfrontier_idle_timeout_s = 1.0\n"
            f"breaker_failure_threshold = 8\nbreaker_reset_s = 2.0\n"
            f'[[tiers]]\nname = "smollm2"\nmodel = "smollm2-135m"\nthreshold = {args.threshold}\n'
            f'[[tiers]]\nname = "frontier"\nkind = "openai"\nmodel = "gpt-test"\nbase_url = "{upstream.url}"\n'
            f"input_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.6\n"
        )
        port = _free_port()
        server = Server(config, port, work / "server.log")
        base = f"http://127.0.0.1:{port}/v1"
        server.start()
        start = time.monotonic()
        end = start + args.duration_s
        kill_at = sorted(start + rng.uniform(0.15, 0.85) * args.duration_s for _ in range(args.kills))
        budget = threading.Semaphore(args.requests)
        stop = threading.Event()

        def worker(seed: int) -> None:
            wrng = random.Random(seed)
            with httpx.Client() as client:
                while not stop.is_set() and time.monotonic() < end:
                    while server.down.is_set() and time.monotonic() < end:
                        time.sleep(0.1)  # no new requests while the server restarts
                    if not budget.acquire(blocking=False):
                        break
                    one_request(client, base, wrng, tally, args.disconnect_rate, server)

        threads = [threading.Thread(target=worker, args=(args.seed * 100 + i,), daemon=True)
                   for i in range(args.concurrency)]
        for t in threads:
            t.start()
        kills_done = 0
        while any(t.is_alive() for t in threads):
            server.sample()
            if kill_at and time.monotonic() >= kill_at[0]:
                kill_at.pop(0)
                server.kill9()
                kills_done += 1
                server.start()
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        server.stop()

    result: dict[str, Any] = {
        "elapsed_s": round(elapsed, 1),
        "kills": kills_done,
        "sent": tally.counts["sent"],
        "answered": tally.counts["answered"],
        "disconnected_by_client": tally.counts["disconnected_by_client"],
        "rejected_429": tally.counts["rejected_429"],
        "failed": {k: v for k, v in tally.counts.items() if k.startswith("failed")},
        "http_5xx": tally.counts["http_5xx"],
        "frontier_calls": len(upstream.requests),
        "frontier_aborted_by_us": upstream.aborted,
        "rss_mb_per_incarnation": [(round(a, 1), round(b, 1)) for a, b in server.rss_mb],
        "rss_growth_mb": round(max((b - a for a, b in server.rss_mb), default=0.0), 1),
        **rows_lost(db, tally.answered_ids),
        "work_dir": str(work),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    bad = result["http_5xx"] > 0 or (result["rows_lost"] or 0) > 0 or result["integrity_check"] not in (None, "ok")
    return 1 if bad else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
