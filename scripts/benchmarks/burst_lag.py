"""How long one worker's event loop stalls when a burst of requests arrives at once.

    python scripts/benchmarks/burst_lag.py --variant off=THREADLINE_INTAKE_CONCURRENCY=0 \\
        --variant intake32=THREADLINE_INTAKE_CONCURRENCY=32 --size 200 --bursts 5

Each variant is ``threadline serve`` (the code as installed, on its own PostgreSQL database,
the echo model answering in ``--model-delay-ms``) with extra ``THREADLINE_*`` settings. The
client, ``--bursts`` times per variant, opens ``--size`` connections (an unmeasured burst),
resets the server's loop-lag window (``POST /debug/metrics/reset``), sends ``--size``
requests at once (new sessions, each on its own connection) and reads the worst lag of the
burst from ``GET /debug/metrics``. Variants take turns burst by burst, so each meets the same
share of whatever else the machine does. Used for docs/performance.md, "The event loop at
saturation".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from agent_run_bench import DEFAULT_DATABASE_URL, python_env, threadline_command
from services import Processes, free_port, reachable_postgres, wait_healthy, with_database


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, settings = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=[THREADLINE_X=V,...], got {text!r}")
    return name, dict(item.split("=", 1) for item in settings.split(",") if item)


async def _burst(client: aiohttp.ClientSession, url: str, size: int, tag: str) -> dict[str, Any]:
    async with client.post(f"{url}/debug/metrics/reset") as reset:
        reset.raise_for_status()

    async def one(index: int) -> None:
        body = {"message_content": f"burst {tag} {index}"}
        async with client.post(f"{url}/api/v1/agent/echo/run", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {await response.text()}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(size)))
    elapsed = time.perf_counter() - started
    async with client.get(f"{url}/debug/metrics") as read:
        lag = (await read.json())["loop_lag"]
    return {"seconds": elapsed, "lag_max_ms": lag["max_ms"], "lag_p99_ms": lag["p99_ms"]}


async def _measure(urls: dict[str, str], size: int, bursts: int) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for number in range(bursts):
        for name, url in urls.items():
            # Fresh connections, opened by an unmeasured burst just before: a variant's idle
            # connections would outlive uvicorn's keep-alive (5 s) while the others run.
            connector = aiohttp.TCPConnector(limit=size)
            async with aiohttp.ClientSession(connector=connector) as client:
                await _burst(client, url, size, f"warm-{number}")
                found[name].append(await _burst(client, url, size, str(number)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", type=_variant, action="append", required=True)
    parser.add_argument("--size", type=int, default=200, help="requests per burst")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--model-delay-ms", type=int, default=50)
    args = parser.parse_args()
    postgres = reachable_postgres(DEFAULT_DATABASE_URL)
    if postgres is None:
        return 2
    procs = Processes()
    urls: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stack.callback(procs.stop_all)
        started: list[tuple[subprocess.Popen[bytes], str]] = []
        for name, settings in args.variant:
            database = f"burst_{name.lower()}"
            postgres.reset(database)
            port = free_port()
            env = python_env()
            env.update(
                THREADLINE_DATABASE_URL=with_database(postgres.url, database),
                THREADLINE_ECHO_DELAY_MS=str(args.model_delay_ms),
                **settings,
            )
            cmd = [*threadline_command(), "serve", "--port", str(port)]
            urls[name] = f"http://127.0.0.1:{port}"
            started.append((procs.start(cmd, env, Path(tmp) / f"{name}.log"), urls[name]))
        for proc, url in started:
            wait_healthy(url, proc, 60.0)
        found = asyncio.run(_measure(urls, args.size, args.bursts))
    print(f"{args.size} requests at once, {args.bursts} bursts per variant (medians, worst)")
    print("| variant | burst answered in | loop lag max, median (worst) | lag p99, median |")
    print("|---|---|---|---|")
    for name, rows in found.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        worst = max(r["lag_max_ms"] for r in rows)
        lag = statistics.median(r["lag_max_ms"] for r in rows)
        p99 = statistics.median(r["lag_p99_ms"] for r in rows)
        print(f"| {name} | {seconds:.2f} s | {lag:.0f} ms ({worst:.0f} ms) | {p99:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
