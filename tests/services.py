"""Throwaway PostgreSQL and Redis servers for the shared-state tests.

Each server is real: started from the installed binaries (`redis-server`; PostgreSQL's `initdb`,
`pg_ctl`, `postgres`) in a temporary directory on a free 127.0.0.1 port, and removed afterwards.
Where a test only needs a server (not one it can pause, stop or kill), the URLs in
`LOCALROUTE_TEST_REDIS_URL` / `LOCALROUTE_TEST_POSTGRES_URL` are used instead when set.

When neither is possible the test skips with a message naming what to install, unless
`LOCALROUTE_TEST_SERVICES=require` (set by `.ci/run`), which turns that skip into a failure: CI
never skips these tests.

PostgreSQL refuses to run as root (`initdb: cannot be run as root`), so as root the server runs as
the `postgres` user (`runuser -u postgres --`), in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "RedisServer", "postgres_server", "redis_server", "require_or_skip"]


def _pg_bin_dirs() -> tuple[str, ...]:
    """/usr/local/bin, then every installed PostgreSQL's bin (Debian's layout), newest first."""

    def version(d: str) -> tuple[int, ...]:
        name = Path(d).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)

    return ("/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True))


PG_BIN_DIRS = _pg_bin_dirs()


def require_or_skip(reason: str) -> None:
    """Skip, or fail when LOCALROUTE_TEST_SERVICES=require (CI)."""
    if os.environ.get("LOCALROUTE_TEST_SERVICES") == "require":
        pytest.fail(f"LOCALROUTE_TEST_SERVICES=require but {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float, alive: object = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


# ---------- Redis ----------


class RedisServer:
    """A redis-server child process; `kill()` and `start()` again keep the port (data is not kept)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, 10)

    def command(self, *args: str) -> str:
        """One command through redis-cli (works while redis-py clients are blocked)."""
        cli = shutil.which("redis-cli")
        if cli is not None:
            out = subprocess.run(
                [cli, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10, check=False
            )
            return out.stdout.strip()
        import redis

        return str(redis.Redis(port=self.port, socket_timeout=5).execute_command(*args))

    def pause(self, ms: int) -> None:
        """CLIENT PAUSE ms ALL: every client's commands wait (it cannot be cancelled early)."""
        self.command("CLIENT", "PAUSE", str(ms), "ALL")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A throwaway Redis (skips, or fails under require, when redis-server is not installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        require_or_skip("needs redis-server (apt-get install redis-server) or LOCALROUTE_TEST_REDIS_URL")
    assert binary is not None
    directory = Path(tempfile.mkdtemp(prefix="localroute-redis-"))
    server = RedisServer(binary, directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# ---------- PostgreSQL ----------


def _pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which(name)


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory; `stop()` and `start()` keep its data and port."""

    def __init__(self, directory: Path, pg_ctl: str, as_user: list[str]) -> None:
        self.dir = directory
        self.pg_ctl = pg_ctl
        self.as_user = as_user
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.dir / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -F -c max_connections=100"
        self._ctl("-o", options, "-l", str(self.dir / "postgres.log"), "-w", "start")
        _wait_port(self.port, 30)

    def stop(self, mode: str = "fast") -> None:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._ctl("-m", mode, "-w", "stop")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL (skips, or fails under require, when the server binaries are missing)."""
    initdb, pg_ctl, postgres = _pg_bin("initdb"), _pg_bin("pg_ctl"), _pg_bin("postgres")
    if initdb is None or pg_ctl is None or postgres is None:
        require_or_skip(
            "needs the PostgreSQL server binaries initdb, pg_ctl, postgres (apt-get install "
            "postgresql) or LOCALROUTE_TEST_POSTGRES_URL"
        )
    assert initdb is not None and pg_ctl is not None
    directory = Path(tempfile.mkdtemp(prefix="localroute-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(directory, ignore_errors=True)
            require_or_skip("running as root needs a `postgres` user to run the PostgreSQL server")
            raise
        os.chown(directory, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_user,
            initdb,
            "-D",
            str(directory / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PostgresServer(directory, pg_ctl, as_user)
    try:
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


# ---------- URLs for tests that only need a server ----------


@contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("LOCALROUTE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with redis_server() as server:
        yield server.url


@contextmanager
def postgres_url() -> Iterator[str]:
    url = os.environ.get("LOCALROUTE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with postgres_server() as server:
        yield server.url
