"""What the benchmark starts and resets: child processes, PostgreSQL databases, Redis.

Every child runs in a process group of its own, so stopping one stops whatever it forked
(uvicorn's workers) and nothing outlives the benchmark.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent.parent


class Processes:
    """Every child process, each in a process group of its own, so that stopping one stops
    whatever it forked (uvicorn's workers) and nothing outlives the benchmark."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # The group may still hold workers even once its leader has exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc, grace=5.0)


def wait_healthy(
    base: str, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None
) -> None:
    """Poll ``base``/health until it answers 200; fail early if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {base} exited with {proc.returncode}{_log_tail(log)}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{base}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server {base} not healthy after {timeout:g}s{_log_tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _log_tail(log: Path | None) -> str:
    return f":\n{tail(log)}" if log is not None else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_database(url: str, database: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if port is not None:
        userinfo, _, _ = netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


def upstream_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"


class Postgres:
    """The admin connection: creates and drops the benchmark databases."""

    def __init__(self, url: str) -> None:
        self.url = url

    def check(self) -> str | None:
        try:
            import psycopg
        except ImportError:
            return "psycopg is not installed (make bench installs the bench extra)"
        try:
            with psycopg.connect(self.url, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"cannot connect to {self.url!r}: {exc}".strip()
        return None

    def reset(self, database: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{database}"')

    def drop(self, database: str) -> None:
        import psycopg

        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    def version(self) -> str:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    @staticmethod
    def round_trip_ms(url: str, samples: int = 200) -> float:
        """Median time of ``SELECT 1`` on one connection: what one round trip costs."""
        import psycopg

        with psycopg.connect(url, connect_timeout=10) as conn:
            for _ in range(20):
                conn.execute("SELECT 1")
            times = []
            for _ in range(samples):
                started = time.perf_counter()
                conn.execute("SELECT 1")
                times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)


def check_redis(url: str) -> str | None:
    if (
        importlib.util.find_spec("threadline.coordination.redis") is None
        and not (REPO / "src" / "threadline" / "queue" / "redis.py").exists()
    ):
        return "threadline has no Redis coordinator yet (threadline.coordination.redis is missing)"
    try:
        import redis
    except ImportError:
        return "the redis package is not installed"
    try:
        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return f"cannot reach Redis at {url!r}: {exc}"
    return None


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=3)
    client.flushdb()
    client.close()
