"""Measure what one turn costs Redis and PostgreSQL with P real server processes.

For each P, the script starts a private ``redis-server`` (so that ``INFO commandstats`` counts
nothing but threadline's traffic) and P ``threadline serve`` processes on PostgreSQL, then:

1. warms up: creates S sessions (one turn each) and waits for their leases to go;
2. measures the idle background for ``--idle-s`` seconds (no traffic);
3. sends N blocking turns (``echo`` agent, not streamed) from S session loops, each message to a
   random process (``random``), to the process its session started at (``sticky``), or, in
   ``pairs``, two messages at once to two different processes (``enqueue``), which forces the
   remote path (claim finds the lease held, NUDGE, answer published to the caller's process);
4. reads the deltas of Redis ``INFO commandstats`` / ``INFO stats`` / ``INFO cpu``, of each
   server's ``/metrics`` pub/sub counters and of PostgreSQL's ``pg_stat_database``, subtracts
   the idle rate over the traffic's duration, divides by N, and prints them next to the scale
   model's prediction (docs/operations.md, "Scale model").

Usage (one P at a time keeps the machine quiet; each run lasts well under a minute)::

    python scripts/benchmarks/scale_model.py --processes 1 2 4 --turns 2000 --routing random

The model's per-turn counts are in ``predict`` below; the doc's table is this script's output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis
from services import Processes, free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent.parent
PG_STATS_SETTLE_S = 13.0
RENEW_S = 6.0 / 3  # LEASE_TTL_MS (default 6 s) / 3
METRIC = re.compile(
    r"^threadline_redis_(pubsub_published|pubsub_received|takeovers)_total"
    r'\{(?:kind|reason)="(\w+)"\} (\S+)$'
)


@dataclass
class Snapshot:
    """Counters at one instant: Redis, PostgreSQL, and the servers' pub/sub counts."""

    at: float
    commands: Counter[str]
    net_in: int
    net_out: int
    cpu: float
    xacts: int
    clients: int
    pubsub: Counter[str] = field(default_factory=Counter)

    def minus(self, other: Snapshot) -> dict[str, float]:
        found: dict[str, float] = {
            f"cmd:{k}": v for k, v in (self.commands - other.commands).items()
        }
        found.update(
            {
                "net_in": self.net_in - other.net_in,
                "net_out": self.net_out - other.net_out,
                "cpu_s": self.cpu - other.cpu,
                "pg_xacts": self.xacts - other.xacts,
            }
        )
        found.update(self.pubsub - other.pubsub)
        return found


async def snapshot(
    redis: Redis, db: asyncpg.Connection, client: httpx.AsyncClient, urls: list[str]
) -> Snapshot:
    stats = await redis.info("commandstats")
    commands: Counter[str] = Counter(
        {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    )
    info = await redis.info("stats")
    cpu = await redis.info("cpu")
    clients = await redis.info("clients")
    xacts = await db.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
        " WHERE datname = current_database()"
    )
    pubsub: Counter[str] = Counter()
    for url in urls:
        text = (await client.get(f"{url}/metrics")).text
        for line in text.splitlines():
            match = METRIC.match(line)
            if match:
                family = match[1].replace("pubsub_", "pubsub:").replace("takeovers", "takeover")
                pubsub[f"{family}:{match[2]}"] += int(float(match[3]))
    return Snapshot(
        time.monotonic(),
        commands,
        int(info["total_net_input_bytes"]),
        int(info["total_net_output_bytes"]),
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(xacts),
        # Our own connection is one of them.
        int(clients["connected_clients"]) - 1,
        pubsub,
    )


def predict(
    local: float, remote: float, renewals: float = 0.0, cleanups: float = 0.0
) -> dict[str, float]:
    """The scale model's counts for ``local`` turns (the lease was free where the message
    arrived) and ``remote`` ones (held by another process: its caller waits at one process,
    the owner runs it), on standalone Redis with unsharded pub/sub, with the bucketed orphan
    index (every script on one slot; the index written by LIST/UNLIST calls of its own).
    ``renewals``: leases renewed meanwhile; ``cleanups``: sessions a watchdog claimed and let
    go again, finding nothing to run (an index entry left by a remote turn whose nudge came
    after the owner's release, below). Not in it:
    SCRIPT EXISTS, one per pipeline that redis-py sends with scripts in it (a claim, an event
    batch, a renewal), which depends on batching; see the doc."""
    turns = local + remote
    # A remote caller's LISTs raise the session's index score past the one its owner knows,
    # but its nudge tells the owner the new score (``Leases.listed_elsewhere``), so every
    # lease period (one per local turn) ends with a matching UNLIST. Left for a cleanup: a
    # period whose release came before the nudge's pub/sub message (rare; counted as
    # ``cleanups``).
    unlisted = local
    found = {
        # Local: LIST + CLAIM (one pipeline), RELEASE, UNLIST, 2 x PUBLISH_EVENT. Remote, at
        # the caller's process: LIST + CLAIM (finds it held), INFLIGHT, LIST + NUDGE +
        # ANNOUNCED; at the owner: 2 x PUBLISH_EVENT and a RELEASE that finds the session
        # dirty.
        "cmd:evalsha": 6 * local + 9 * remote,
        "cmd:time": local + 3 * remote,
        "cmd:zscore": 2 * local + 2 * remote,
        "cmd:zadd": local + 3 * remote,
        # ANNOUNCED (the remote caller's in-flight entry) and the UNLISTs that match.
        "cmd:zrem": remote + unlisted,
        "cmd:get": 2 * local + 3 * remote,
        "cmd:set": turns,
        "cmd:del": 2 * local + remote,
        "cmd:xadd": 2 * turns,
        "cmd:pexpire": 2 * turns,
        # 2 run events per turn (to nobody: no watcher); remote adds the nudge to the owner
        # and the answer to the caller's process, both sent by the client.
        "cmd:publish": 2 * turns + 2 * remote,
        "pubsub:published:event": 2 * turns,
        "pubsub:published:nudge": remote,
        "pubsub:published:answer": remote,
        "pubsub:received:event": 0,
        "pubsub:received:nudge": remote,
        "pubsub:received:answer": remote,
        # PostgreSQL statements (one transaction each). Local: the route's get_session,
        # add_user_message(start=...), commit_run. Remote, at the caller's process:
        # get_session, unanswered (the backlog bound), add_user_message, the mailbox's
        # answer_for; at the owner: start_run, commit_run, and the take-over after the dirty
        # release (get_session, unanswered).
        "pg_xacts": 3 * local + 8 * remote,
    }
    # Renewals of the leases held meanwhile (LIST + RENEW each).
    for key in ("cmd:time", "cmd:zscore", "cmd:zadd", "cmd:get", "cmd:pexpire"):
        found[key] += renewals
    found["cmd:evalsha"] += 2 * renewals
    # A cleanup is a local turn's LIST, CLAIM, RELEASE and matching UNLIST without the run:
    # no events, and the take-over's two reads (get_session, unanswered) in PostgreSQL.
    for key, count in {
        "cmd:evalsha": 4,
        "cmd:time": 1,
        "cmd:zscore": 2,
        "cmd:zadd": 1,
        "cmd:zrem": 1,
        "cmd:get": 2,
        "cmd:set": 1,
        "cmd:del": 2,
        "pg_xacts": 2,
        "takeover:orphan": 1,
    }.items():
        found[key] = found.get(key, 0.0) + count * cleanups
    return found


async def session_loop(
    client: httpx.AsyncClient,
    urls: list[str],
    session: str,
    home: str,
    turns: int,
    routing: str,
    rng: random.Random,
    stagger_s: float = 0.0,
    think_s: float = 0.0,
) -> None:
    for index in range(turns):
        # A caller reads the answer before it writes again; meanwhile the owner lets the
        # lease go (without a pause the next message races the release: see the doc).
        await asyncio.sleep(think_s)
        if routing == "pairs":
            first, second = rng.sample(urls, 2)
            # The second a little after the first: stored while the first's run is going
            # (both at once, the second may be stored before the first's run opened, which
            # then answers both).
            a = asyncio.ensure_future(send(client, first, session, f"a{index}", "enqueue"))
            await asyncio.sleep(stagger_s)
            await asyncio.gather(a, send(client, second, session, f"b{index}", "enqueue"))
            continue
        url = home if routing == "sticky" else rng.choice(urls)
        await send(client, url, session, f"m{index}", "merge")


LATENCIES: list[float] = []


async def send(
    client: httpx.AsyncClient, url: str, session: str | None, text: str, strategy: str
) -> str:
    started = time.monotonic()
    body: dict[str, Any] = {"message_content": text, "strategy": strategy}
    if session is not None:
        body["session_id"] = session
    response = await client.post(f"{url}/api/v1/agent/echo/run", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{url}: {response.status_code} {response.text}")
    LATENCIES.append(time.monotonic() - started)
    return str(response.json()["session_id"])


async def measure(args: argparse.Namespace, count: int, workdir: Path) -> dict[str, Any]:
    procs = Processes()
    try:
        redis_port = free_port()
        redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
        redis_cmd += ["--save", "", "--appendonly", "no"]
        procs.start(redis_cmd, dict(os.environ), workdir / f"redis-{count}.log")
        redis = Redis(port=redis_port)
        for _ in range(100):
            with contextlib.suppress(Exception):
                if await redis.ping():
                    break
            await asyncio.sleep(0.05)
        if args.monitor is not None:
            # Every command Redis runs, scripts' included, for reading a path by hand.
            monitor = ["redis-cli", "-p", str(redis_port), "monitor"]
            procs.start(monitor, dict(os.environ), args.monitor)
        env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO)) if p)
        env.update(
            THREADLINE_DATABASE_URL=args.database_url,
            THREADLINE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            THREADLINE_POOL_MIN_SIZE="2",
            THREADLINE_POOL_MAX_SIZE=str(args.pool_max_size),
            THREADLINE_LOG_LEVEL="warning",
            THREADLINE_ECHO_DELAY_MS=str(args.echo_delay_ms),
            # A fixed limit above the sessions in flight: with "auto" the limit shrinks when
            # the loop lags (a busy machine), and a turn that waits for a slot opens its run
            # in a statement of its own (start_run), one PostgreSQL round trip more.
            THREADLINE_MAX_CONCURRENT_RUNS=str(max(64, 2 * args.sessions)),
        )
        urls: list[str] = []
        servers = []
        for index in range(count):
            port = free_port()
            cmd = [sys.executable, "-m", "threadline", "serve", "--port", str(port)]
            log = workdir / f"server-{count}-{index}.log"
            servers.append((procs.start(cmd, env, log), f"http://127.0.0.1:{port}", log))
        for proc, url, log in servers:
            wait_healthy(url, proc, 60, log)
            urls.append(url)
        db = await asyncpg.connect(args.database_url)
        rng = random.Random(args.seed)
        async with httpx.AsyncClient(timeout=60) as client:
            homes = [rng.choice(urls) for _ in range(args.sessions)]
            sessions = list(
                await asyncio.gather(*(send(client, h, None, "hello", "merge") for h in homes))
            )
            # Warm every process's statement cache and script cache on every session.
            await asyncio.gather(
                *(
                    session_loop(client, urls, s, h, 2, "random", rng)
                    for s, h in zip(sessions, homes, strict=True)
                )
            )
            # Every server backend flushes its statistics to pg_stat_database within
            # PGSTAT_IDLE_INTERVAL (10 s) of its last transaction (PostgreSQL 15): wait that
            # long before each reading that ends a stretch of traffic.
            await asyncio.sleep(PG_STATS_SETTLE_S)
            idle_start = await snapshot(redis, db, client, urls)
            await asyncio.sleep(args.idle_s)
            idle_end = await snapshot(redis, db, client, urls)
            per_session = args.turns // args.sessions
            if args.routing == "pairs":
                per_session //= 2
            stagger, think = args.echo_delay_ms / 1000 / 4, args.think_ms / 1000
            start = await snapshot(redis, db, client, urls)
            LATENCIES.clear()
            await asyncio.gather(
                *(
                    session_loop(client, urls, s, h, per_session, args.routing, rng, stagger, think)
                    for s, h in zip(sessions, homes, strict=True)
                )
            )
            await asyncio.sleep(PG_STATS_SETTLE_S)  # the idle rate covers this stretch
            end = await snapshot(redis, db, client, urls)
        await db.close()
        await redis.aclose()
    finally:
        procs.stop_all()
    turns = per_session * args.sessions * (2 if args.routing == "pairs" else 1)
    idle = idle_end.minus(idle_start)
    idle_s = idle_end.at - idle_start.at
    busy = end.minus(start)
    busy_s = end.at - start.at
    # Subtract the idle background (snapshots included) over the traffic's duration.
    per_turn = {
        k: (v - idle.get(k, 0.0) * busy_s / idle_s) / turns for k, v in sorted(busy.items())
    }
    remote = busy.get("pubsub:published:nudge", 0.0)
    # A lease is held about as long as its caller waits; every RENEW_S each held lease is
    # renewed once (one RENEW script: TIME, GET, ZADD, PEXPIRE).
    renewals = sum(LATENCIES) / RENEW_S
    cleanups = busy.get("takeover:orphan", 0.0)
    predicted = {
        k: v / turns for k, v in predict(turns - remote, remote, renewals, cleanups).items()
    }
    return {
        "processes": count,
        "routing": args.routing,
        "turns": turns,
        "sessions": args.sessions,
        "seconds": round(busy_s, 2),
        "echo_delay_ms": args.echo_delay_ms,
        "think_ms": args.think_ms,
        "remote_share": remote / turns,
        "mean_latency_s": sum(LATENCIES) / max(1, len(LATENCIES)),
        "redis_clients_per_process": end.clients / count,
        "idle_per_s_per_process": {k: v / idle_s / count for k, v in sorted(idle.items())},
        "per_turn": per_turn,
        "predicted": predicted,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"P={result['processes']} routing={result['routing']} turns={result['turns']}"
        f" sessions={result['sessions']} in {result['seconds']} s,"
        f" remote share {result['remote_share']:.3f},"
        f" mean latency {result['mean_latency_s'] * 1000:.0f} ms,"
        f" Redis connections per process {result['redis_clients_per_process']:.1f}",
        f"{'counter':32} {'predicted':>10} {'measured':>10} {'diff':>8}",
    ]
    measured, predicted = result["per_turn"], result["predicted"]
    for key in sorted(set(measured) | set(predicted)):
        got = measured.get(key, 0.0)
        want = predicted.get(key)
        if want is None:
            lines.append(f"{key:32} {'':>10} {got:10.3f}")
            continue
        diff = f"{(got - want) / want * 100:+7.1f}%" if want else f"{got - want:+8.3f}"
        lines.append(f"{key:32} {want:10.3f} {got:10.3f} {diff}")
    lines.append("idle, per process per second:")
    for key, value in result["idle_per_s_per_process"].items():
        lines.append(f"  {key:30} {value:10.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--routing", choices=["random", "sticky", "pairs"], default="random")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--pool-max-size", type=int, default=5)
    # A delay keeps a pair's first run going while the second message arrives and is
    # nudged: "pairs" then takes the remote path every time, not only when it wins a race.
    parser.add_argument("--echo-delay-ms", type=int, default=0)
    parser.add_argument("--think-ms", type=int, default=20)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "THREADLINE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/threadline"
        ),
    )
    parser.add_argument("--monitor", type=Path, help="write Redis MONITOR output here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-model-") as tmp:
        for count in args.processes:
            if args.routing == "pairs" and count < 2:
                continue
            result = await measure(args, count, Path(tmp))
            print(table(result), flush=True)
            results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
