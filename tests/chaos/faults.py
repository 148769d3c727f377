"""The chaos loop: phases of faults, each repaired before the next, each followed by probes.

Phases (``--phases``, run in the order given; the whole list once, then again while time is
left):

``kill``
    After 10-20 s of calm, SIGKILL a random process and start it again on its port.
``redis``
    Stop the private Redis for 15 s, then start it again, empty.
``postgres``
    Crash the private PostgreSQL cluster (``pg_ctl stop -m immediate``), leave it down a few
    seconds, start it again.
``partition``
    Freeze one random process's proxy to Redis for a few lease TTLs, then thaw it; then the
    same with another process's proxies to Redis and PostgreSQL both. The process is neither
    told nor killed: it keeps running what it believes it owns while the others take its
    sessions over (cut from Redis alone, it can still try to commit).

After each fault the loop probes every process (a message to that process's probe session,
repeated until one gets a 2xx, bounded), so that recovery is observed even when the load has
gone elsewhere. Every fault is recorded in the history with the times it began and ended.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from tests.chaos.history import Fault, FaultKind, History
from tests.chaos.load import Client
from tests.chaos.proxy import ProxyProcess
from tests.chaos.servers import Fleet
from tests.chaos.services import PrivatePostgres, PrivateRedis

PHASES: tuple[FaultKind, ...] = ("kill", "redis", "postgres", "partition")


@dataclass(frozen=True, slots=True)
class FaultConfig:
    kill_after_s: tuple[float, float] = (10.0, 20.0)
    kill_down_s: tuple[float, float] = (0.5, 2.0)
    redis_down_s: float = 15.0
    postgres_down_s: float = 5.0
    partition_s: float = 6.0
    calm_s: float = 3.0
    probe_for_s: float = 20.0


class ChaosLoop:
    def __init__(
        self,
        config: FaultConfig,
        fleet: Fleet,
        redis: PrivateRedis,
        postgres: PrivatePostgres,
        proxies: ProxyProcess,
        client: Client,
        probe_sessions: Sequence[UUID],
        history: History,
        rng: random.Random,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.redis = redis
        self.postgres = postgres
        self.proxies = proxies
        self.client = client
        self.probe_sessions = list(probe_sessions)
        self.history = history
        self.rng = rng

    async def run(self, phases: Sequence[FaultKind], duration_s: float) -> None:
        """Every phase once, then again in turn while ``duration_s`` has not run out."""
        deadline = time.monotonic() + duration_s
        for round_ in range(1_000 if phases else 0):
            for phase in phases:
                if round_ > 0 and time.monotonic() >= deadline:
                    return
                await self._phases[phase]()
                await self._probe()

    @property
    def _phases(self) -> dict[FaultKind, Callable[[], Awaitable[None]]]:
        return {
            "kill": self.kill,
            "redis": self.redis_outage,
            "postgres": self.postgres_restart,
            "partition": self.partition,
        }

    async def kill(self) -> None:
        await asyncio.sleep(self.rng.uniform(*self.config.kill_after_s))
        victim = self.rng.randrange(len(self.fleet.servers))
        start = time.time()
        await self.fleet.kill(victim)
        try:
            await asyncio.sleep(self.rng.uniform(*self.config.kill_down_s))
        finally:
            await self.fleet.restart(victim)
            self._record("kill", start, victim, f"SIGKILL server {victim}", ())

    async def redis_outage(self) -> None:
        await asyncio.sleep(self.config.calm_s)
        start = time.time()
        await self.redis.stop()
        try:
            await asyncio.sleep(self.config.redis_down_s)
        finally:
            await self.redis.start()
            self._record(
                "redis", start, None, f"redis down {self.config.redis_down_s:g}s", ("redis",)
            )

    async def postgres_restart(self) -> None:
        await asyncio.sleep(self.config.calm_s)
        start = time.time()
        await self.postgres.stop()
        try:
            await asyncio.sleep(self.config.postgres_down_s)
        finally:
            await self.postgres.start()
            self._record("postgres", start, None, "pg_ctl stop -m immediate; start", ("postgres",))

    async def partition(self) -> None:
        first, second = self.rng.sample(range(len(self.fleet.servers)), 2)
        await self._cut(first, postgres_too=False)
        await self._probe()
        await self._cut(second, postgres_too=True)

    async def _cut(self, victim: int, postgres_too: bool) -> None:
        await asyncio.sleep(self.config.calm_s)
        # Proxies come in pairs per server: PostgreSQL at 2i, Redis at 2i + 1.
        cut = [2 * victim, 2 * victim + 1] if postgres_too else [2 * victim + 1]
        services = ("redis", "postgres") if postgres_too else ("redis",)
        what = "+".join(services)
        start = time.time()
        await self.proxies.freeze(*cut)
        try:
            await asyncio.sleep(self.config.partition_s)
        finally:
            await self.proxies.thaw(*cut)
            self._record("partition", start, victim, f"server {victim} cut from {what}", services)

    def _record(
        self,
        kind: FaultKind,
        start: float,
        server: int | None,
        detail: str,
        services: tuple[str, ...],
    ) -> None:
        self.history.faults.append(Fault(kind, start, time.time(), server, detail, services))

    async def _probe(self) -> None:
        """Until each process has answered one message with a 2xx (bounded)."""

        async def probe(server: int) -> None:
            session_id = self.probe_sessions[server]
            deadline = time.monotonic() + self.config.probe_for_s
            while time.monotonic() < deadline:
                content = self.client.content("probe", session_id, f"server {server}")
                if (await self.client.send(session_id, content, server, "probe")).ok:
                    return
                await asyncio.sleep(0.25)

        await asyncio.gather(*(probe(i) for i in range(len(self.fleet.servers))))
