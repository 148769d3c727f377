"""What the benchmark starts and resets: child processes, PostgreSQL databases, Redis.

Every child runs in a process group of its own, so stopping one stops whatever it forked
(uvicorn's workers) and nothing outlives the benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent.parent
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _child_setup(parent: int) -> None:
    """Run in each child between fork and exec (``preexec_fn``): die with the benchmark.

    ``start_new_session`` has already made the child a process-group leader. The parent-death
    signal kills the child itself the moment the benchmark dies, however it dies (SIGKILL
    included); what the child forks (uvicorn's workers) is left to the watchdog, which kills
    the whole group. The file-descriptor soft limit goes up to the hard one so that a server
    or the load client can hold 10,000 streams.
    """
    with contextlib.suppress(OSError, ValueError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl: then the signal never comes.
    if os.getppid() != parent:
        os._exit(1)


class Processes:
    """Every child process, each in a process group of its own, so that stopping one stops
    whatever it forked (uvicorn's workers), and nothing outlives the benchmark: not when it
    stops, not when it is killed (``_child_setup`` and ``watchdog.py``)."""

    def __init__(self, watch: bool = True) -> None:
        self._running: list[subprocess.Popen[bytes]] = []
        self._watch = watch
        self._cleanup: list[str] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._groups_file: Path | None = None

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        if self._watch and self._watchdog is None:
            self._start_watchdog()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=functools.partial(_child_setup, os.getpid()),
            )
        self._running.append(proc)
        self._publish()
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
            self._publish()

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc, grace=5.0)
        if self._watchdog is not None:
            # Its work is done: it would only find the groups list empty.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._watchdog.pid, signal.SIGKILL)
            self._watchdog.wait(5)
            self._watchdog = None
        if self._groups_file is not None:
            with contextlib.suppress(OSError):
                self._groups_file.unlink()

    def add_cleanup(self, repo: Path, worktree: Path) -> None:
        """A git worktree of ``repo`` the watchdog removes if the benchmark dies without
        removing it."""
        self._cleanup.append(f"{repo}\t{worktree}")
        if self._watch and self._watchdog is None:
            self._start_watchdog()
        self._publish()

    def _start_watchdog(self) -> None:
        fd, name = tempfile.mkstemp(prefix="bench-groups-", suffix=".txt")
        os.close(fd)
        self._groups_file = Path(name)
        self._publish()
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("watchdog.py")),
            "--parent",
            str(os.getpid()),
            "--groups",
            name,
        ]
        # Its own session (a Ctrl-C to the benchmark's terminal must not reach it first) and
        # no parent-death signal: outliving the benchmark is its job.
        self._watchdog = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True
        )

    def _publish(self) -> None:
        """Tell the watchdog which groups and worktrees are ours (atomically: it may be reading)."""
        if self._groups_file is None:
            return
        lines = [f"group {p.pid}" for p in self._running] + [f"worktree {w}" for w in self._cleanup]
        tmp = self._groups_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, self._groups_file)


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


def reachable_postgres(default_url: str) -> Postgres | None:
    """The benchmarks' PostgreSQL (``THREADLINE_BENCH_DATABASE_URL``, else ``default_url``),
    or None once stderr says why it cannot be used."""
    postgres = Postgres(os.environ.get("THREADLINE_BENCH_DATABASE_URL", default_url))
    problem = postgres.check()
    if problem is None:
        return postgres
    print(f"PostgreSQL unavailable: {problem}", file=sys.stderr)
    return None
