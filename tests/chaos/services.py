"""The chaos run's own Redis and PostgreSQL, which it stops and restarts at will.

Neither is the shared service of the machine: Redis is a ``redis-server`` on a free port with
no persistence (it comes back empty, as after a crash); PostgreSQL is a cluster ``initdb``
creates in a temporary directory, listening on a free port with its socket in that directory.
``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user
and every command runs through ``runuser``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.multiprocess.conftest import RedisServer, free_port, start_redis

CLUSTER_USER = "postgres"
PG_BINARIES = "/usr/lib/postgresql/*/bin"
# The cluster holds only what one run writes, and a crash we inject is a process crash, not
# a machine crash, so the OS still holds what fsync would have forced: skip it for speed.
PG_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200"
)


class ServiceMissing(RuntimeError):
    """A binary the chaos run needs (redis-server, initdb) is not installed."""


def postgres_bindir() -> Path:
    found = sorted(glob.glob(f"{PG_BINARIES}/initdb"))
    if not found:
        raise ServiceMissing(f"no initdb under {PG_BINARIES}: install PostgreSQL server binaries")
    return Path(found[-1]).parent


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise ServiceMissing("redis-server is not on PATH")
    return found


@dataclass
class PrivateRedis:
    """A ``redis-server`` of our own on a fixed port, stopped and started again on it."""

    binary: str
    cwd: Path
    server: RedisServer | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await start_redis(self.binary, self.cwd, self.port or None)
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.child.stop()
            self.server = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory, on a port of its own."""

    bindir: Path
    root: Path
    port: int

    @classmethod
    async def create(cls) -> PrivatePostgres:
        bindir = postgres_bindir()
        root = Path(tempfile.mkdtemp(prefix="threadline-chaos-pg-"))
        self = cls(bindir, root, free_port())
        try:
            if os.geteuid() == 0:
                owner = pwd.getpwnam(CLUSTER_USER)
                os.chown(root, owner.pw_uid, owner.pw_gid)
            await self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust")
            await self.start()
        except BaseException:
            await self.destroy()
            raise
        return self

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def start(self) -> None:
        options = f"-p {self.port} -k {self.root} {PG_OPTIONS}"
        log = str(self.root / "postgres.log")
        await self._run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", "60", "-o", options, "start"
        )

    async def stop(self) -> None:
        """Crash it: ``immediate`` kills every backend without a checkpoint."""
        await self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    async def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                await self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = (self.root / "postgres.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    async def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", CLUSTER_USER, "--", *argv]
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.root,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 120)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"{tool} failed ({process.returncode}): {output.decode()[-2000:]}")
