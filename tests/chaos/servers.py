"""The threadline processes under test: killed with SIGKILL and restarted on the same port.

Each server is ``python -m threadline serve`` in its own process group, reaching PostgreSQL and
Redis through proxies of its own (``proxy.py``). Its output goes to ``server-I.log`` in the run
directory, every incarnation appended with a header line, so a violation's ids can be looked
up in the logs afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.multiprocess.conftest import free_port

HEALTHY_WITHIN_S = 60.0


@dataclass
class Server:
    index: int
    port: int
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None
    incarnation: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Fleet:
    """Every server process of the run; stops them all (process groups) on ``aclose``."""

    servers: list[Server] = field(default_factory=list)

    @classmethod
    async def start(cls, envs: list[dict[str, str]], rundir: Path) -> Fleet:
        fleet = cls(
            [Server(i, free_port(), env, rundir / f"server-{i}.log") for i, env in enumerate(envs)]
        )
        try:
            await asyncio.gather(*(fleet.restart(s.index) for s in fleet.servers))
        except BaseException:
            await fleet.aclose()
            raise
        return fleet

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    async def restart(self, index: int) -> None:
        """Start server ``index`` (again) and wait until it answers ``/health``."""
        server = self.servers[index]
        server.incarnation += 1
        argv = (sys.executable, "-m", "threadline", "serve", "--port", str(server.port))
        with server.log.open("ab") as out:
            stamp = time.strftime("%H:%M:%S")
            out.write(f"=== incarnation {server.incarnation} at {stamp} ===\n".encode())
            out.flush()
            server.process = await asyncio.create_subprocess_exec(
                *argv,
                env=server.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        await self._healthy(server)

    async def kill(self, index: int) -> None:
        """SIGKILL the server's process group: no shutdown, no lease released."""
        await _signal(self.servers[index], signal.SIGKILL)

    async def aclose(self) -> None:
        await asyncio.gather(*(_stop(s) for s in self.servers))

    async def _healthy(self, server: Server) -> None:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if not server.running:
                    raise RuntimeError(
                        f"server {server.index} exited during start-up: {server.log}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{server.url}/health")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"server {server.index} not healthy in {HEALTHY_WITHIN_S}s")


async def _signal(server: Server, sig: signal.Signals) -> None:
    if server.process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, sig)
    await server.process.wait()


async def _stop(server: Server) -> None:
    if not server.running:
        return
    assert server.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(server.process.wait(), 15)
    finally:
        # Whatever the leader left behind in its group goes with it.
        await _signal(server, signal.SIGKILL)
