"""Simulate the idle background of N server processes against one real Redis.

A machine cannot hold 1,000 ``threadline serve`` processes, but what an idle process asks of
Redis is small and known: its lease renewals (every ``LEASE_TTL_MS``/3, one pipeline of one
RENEW per held lease) and its watchdog (every max(0.2 s, ``LEASE_TTL_MS``/4): one STRANDED and
one ORPHANS script). This script runs N lightweight "processes" in one Python process, each
with its own real ``Leases`` (the class the servers use) holding H leases, on the same
timers, against a private ``redis-server``; it reads Redis's ``INFO commandstats`` and
``INFO cpu`` over the run and prints commands/s and Redis CPU next to the model's prediction.

The N instances share two connection pools (requests, renewals), so 1,000 of them do not
need 3,000 sockets; a real process holds at least three connections of its own (see the doc).

    python scripts/benchmarks/scale_background.py --instances 10 100 1000 --leases 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections import Counter
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from services import free_port

from threadline.coordination.channels import Channels
from threadline.coordination.leases import BUCKETS_PER_TICK, Leases

TTL_MS = 6_000  # the default LEASE_TTL_MS
RENEW_S = TTL_MS / 1000 / 3
WATCH_S = max(0.2, TTL_MS / 1000 / 4)


async def stats(redis: Redis) -> tuple[Counter[str], float]:
    found = await redis.info("commandstats")
    commands: Counter[str] = Counter(
        {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in found.items()}
    )
    cpu = await redis.info("cpu")
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def instance(leases: Leases, stop: asyncio.Event, ticks: Counter[str]) -> None:
    """One process's two background loops, as ``RedisCoordinator`` runs them; started at a
    random phase, as real processes are."""

    async def every(interval: float, name: str) -> None:
        await asyncio.sleep(random.uniform(0, interval))
        while not stop.is_set():
            started = time.monotonic()
            if name == "renew":
                await leases.renew(lambda _: True)
            else:
                await leases.scan(20)
            ticks[name] += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    await asyncio.gather(every(RENEW_S, "renew"), every(WATCH_S, "watch"))


async def simulate(port: int, count: int, held: int, seconds: float) -> dict[str, Any]:
    url = f"redis://127.0.0.1:{port}/0"
    requests = Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=64))
    renewal = Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=32))
    channels = Channels(requests, requests, sharded=False, timeout_s=10.0)
    all_leases = []
    for _ in range(count):
        leases = Leases(
            requests,
            renewal,
            uuid.uuid4().hex,
            channels,
            ttl_ms=TTL_MS,
            dirty_ttl_ms=TTL_MS * 10,
            timeout_s=10.0,
        )
        await asyncio.gather(*(leases.claim(uuid.uuid4()) for _ in range(held)))
        all_leases.append(leases)
    stop = asyncio.Event()
    ticks: Counter[str] = Counter()
    tasks = [asyncio.ensure_future(instance(x, stop, ticks)) for x in all_leases]
    await asyncio.sleep(RENEW_S)  # every loop has started
    ticks.clear()
    before, cpu_before = await stats(requests)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after, cpu_after = await stats(requests)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*tasks)
    lost = sum(held - len(x) for x in all_leases)
    await requests.aclose()
    await renewal.aclose()
    rates = {k: v / elapsed for k, v in sorted((after - before).items()) if k != "info"}
    return {
        "instances": count,
        "leases_each": held,
        "seconds": round(elapsed, 1),
        "commands_per_s": rates,
        "redis_cpu_share": (cpu_after - cpu_before) / elapsed,
        "renew_ticks_per_s": ticks["renew"] / elapsed,
        "watch_ticks_per_s": ticks["watch"] / elapsed,
        "leases_lost": lost,
        # The model: per instance, RENEW_S^-1 renewal pipelines (LIST + RENEW per lease, one
        # SCRIPT EXISTS) and WATCH_S^-1 watchdog passes (ORPHANS + STRANDED on each of
        # BUCKETS_PER_TICK buckets, one pipeline, one SCRIPT EXISTS).
        "predicted_evalsha_per_s": count * (2 * held / RENEW_S + 2 * BUCKETS_PER_TICK / WATCH_S),
        "predicted_script_exists_per_s": count * (1 / RENEW_S + 1 / WATCH_S),
    }


def show(result: dict[str, Any]) -> str:
    rates = result["commands_per_s"]
    evalsha = rates.get("evalsha", 0.0)
    want = result["predicted_evalsha_per_s"]
    return (
        f"N={result['instances']:5} H={result['leases_each']:3}"
        f" evalsha/s {evalsha:9.1f} (model {want:9.1f}, {(evalsha - want) / want * 100:+.1f}%)"
        f" script|exists/s {rates.get('script|exists', 0.0):7.1f}"
        f" (model {result['predicted_script_exists_per_s']:7.1f})"
        f" all commands/s {sum(rates.values()):9.1f}"
        f" redis CPU {result['redis_cpu_share'] * 100:5.1f}%"
        f" leases lost {result['leases_lost']}"
    )


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--leases", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    for count in args.instances:
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            probe = Redis(port=port)
            for _ in range(100):
                with contextlib.suppress(Exception):
                    if await probe.ping():
                        break
                await asyncio.sleep(0.05)
            await probe.aclose()
            result = await simulate(port, count, args.leases, args.seconds)
            print(show(result), flush=True)
        finally:
            server.terminate()
            await server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
