"""The partition switch: TCP proxies between each server and Redis/PostgreSQL, in a child process.

Each server reaches Redis and PostgreSQL only through proxies of its own, so freezing one
server's proxies partitions that server alone (``tests/tcp_proxy.py``: a frozen proxy keeps
every connection open and moves no byte). The proxies live in a process of their own so that
the client's load and the harness's event loop do not add latency to every query.

Run as ``python -m tests.chaos.proxy HOST:PORT ...``: it prints the listening ports as one
JSON line, then obeys ``freeze I`` / ``thaw I`` lines on stdin (answering ``ok``) until EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass

from tests.tcp_proxy import TcpProxy


@dataclass
class ProxyProcess:
    """The child process holding the proxies, driven over its stdin and stdout."""

    process: asyncio.subprocess.Process
    ports: list[int]

    @classmethod
    async def start(cls, targets: list[tuple[str, int]], env: dict[str, str]) -> ProxyProcess:
        argv = [sys.executable, "-m", "tests.chaos.proxy", *(f"{h}:{p}" for h, p in targets)]
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            ports = [int(p) for p in json.loads(line)]
        except BaseException:
            await _kill(process)
            raise
        return cls(process, ports)

    async def freeze(self, *indexes: int) -> None:
        for index in indexes:
            await self._command(f"freeze {index}")

    async def thaw(self, *indexes: int) -> None:
        for index in indexes:
            await self._command(f"thaw {index}")

    async def _command(self, line: str) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        answer = await asyncio.wait_for(self.process.stdout.readline(), 10)
        if answer.strip() != b"ok":
            raise RuntimeError(f"proxy process answered {answer!r} to {line!r}")

    async def stop(self) -> None:
        if self.process.stdin is not None and self.process.returncode is None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            await _kill(self.process)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def _serve(targets: list[str]) -> None:
    proxies = []
    for target in targets:
        host, _, port = target.rpartition(":")
        proxy = TcpProxy(host, int(port))
        await proxy.start()
        proxies.append(proxy)
    print(json.dumps([p.port for p in proxies]), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := await stdin.readline():
            verb, _, index = line.decode().partition(" ")
            proxy = proxies[int(index)]
            proxy.freeze() if verb == "freeze" else proxy.thaw()
            print("ok", flush=True)
    finally:
        await asyncio.gather(*(p.cut() for p in proxies))


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1:]))
