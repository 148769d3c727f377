"""One chaos run from start to verdict: services, servers, load and faults, quiescence, checks.

1. A private PostgreSQL cluster and Redis; the schema; the sessions (and one probe session
   per process) created directly in the store.
2. The proxy process, and the servers behind it.
3. Load and the chaos loop together; the load stops when the chaos loop has finished.
4. Quiescence: wait (bounded) until no run is unfinished and no message unanswered; what is
   still unanswered then is counted as ``stranded_after_settle``. A final round sends one
   message to each such session (its next run must answer everything before it).
5. Read every chaos session's rows and run ``checker.check``.

Everything started is stopped in ``finally`` blocks, each process in a group of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from tests.chaos.checker import UNFINISHED, Limits, Report, check
from tests.chaos.faults import PHASES, ChaosLoop, FaultConfig
from tests.chaos.history import FaultKind, History, Snapshot, snapshot
from tests.chaos.load import Client, LoadConfig, run_load
from tests.chaos.proxy import ProxyProcess
from tests.chaos.servers import Fleet
from tests.chaos.services import PrivatePostgres, PrivateRedis, redis_binary
from tests.multiprocess.conftest import ROOT, server_env
from threadline.store import PostgresStore

USER_ID = "chaos"


@dataclass(frozen=True)
class ChaosConfig:
    duration_s: float = 600.0
    sessions: int = 300
    seed: int = 1
    phases: tuple[FaultKind, ...] = PHASES
    servers: int = 3
    lease_ttl_ms: int = 2000
    # One value per process, so that runs of different lengths overlap and get superseded.
    echo_delay_ms: tuple[int, ...] = (20, 60, 100)
    redis_timeout_s: float = 1.0
    slack_s: float = 1.0
    recovery_s: float = 10.0
    settle_s: float = 8.0
    load: LoadConfig = field(default_factory=LoadConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    def limits(self) -> Limits:
        return Limits(
            lease_ttl_s=self.lease_ttl_ms / 1000,
            model_call_s=max(self.echo_delay_ms) / 1000,
            # A claim is tried twice, each within REDIS_TIMEOUT_S (docs/architecture.md).
            fast_503_s=2 * self.redis_timeout_s + self.slack_s,
            recovery_s=self.recovery_s,
            slack_s=self.slack_s,
        )


@dataclass
class ChaosResult:
    config: ChaosConfig
    history: History
    snapshot: Snapshot
    report: Report
    figures: dict[str, Any]
    rundir: Path

    def summary(self, examples: int = 5) -> dict[str, Any]:
        """What ``--json`` writes: the figures, each invariant's count, some examples."""
        config = dataclasses.asdict(self.config)
        return {
            "config": config,
            "figures": self.figures,
            "invariants": self.report.counts(),
            "examples": {k: v[:examples] for k, v in self.report.violations.items() if v},
            "logs": str(self.rundir),
        }


async def run_chaos(config: ChaosConfig, rundir: Path) -> ChaosResult:
    rng = random.Random(config.seed)
    history = History()
    started = time.time()
    postgres = await PrivatePostgres.create()
    redis = PrivateRedis(redis_binary(), rundir)
    proxies: ProxyProcess | None = None
    fleet: Fleet | None = None
    client: Client | None = None
    try:
        await redis.start()
        sessions, probes = await _create_sessions(postgres.url, config)
        targets = [
            ("127.0.0.1", port)
            for _ in range(config.servers)
            for port in (postgres.port, redis.port)
        ]
        proxies = await ProxyProcess.start(targets, _child_env())
        fleet = await Fleet.start(_server_envs(config, proxies.ports), rundir)
        client = Client(fleet.urls, history, config.load.request_timeout_s)
        chaos = ChaosLoop(
            config.faults, fleet, redis, postgres, proxies, client, probes, history, rng
        )
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(client, sessions, config.load, rng, stop))
        try:
            await chaos.run(config.phases, config.duration_s)
        finally:
            stop.set()
            bursts = await load
        async with _reader(postgres.url) as db:
            stranded = await _settle(db, config.settle_s)
            settled = await snapshot(db, USER_ID)
            await _final_round(db, client, rng)
            found = await snapshot(db, USER_ID)
            found.unfinished_at_settle = [r for r in settled.runs if r.status in UNFINISHED]
    finally:
        if client is not None:
            await client.aclose()
        if fleet is not None:
            await fleet.aclose()
        if proxies is not None:
            await proxies.stop()
        await redis.stop()
        await postgres.destroy()
    report = check(history, found, config.limits())
    figures = _figures(history, found, report, bursts, stranded, time.time() - started)
    result = ChaosResult(config, history, found, report, figures, rundir)
    _save(result)
    return result


def _save(result: ChaosResult) -> None:
    """The summary, and everything the checker saw (one JSON object a line) for looking
    violations up."""
    summary = json.dumps(result.summary(examples=20), indent=2, default=str)
    (result.rundir / "summary.json").write_text(summary + "\n")
    with (result.rundir / "history.jsonl").open("w") as out:
        for kind, items in (
            ("fault", result.history.faults),
            ("request", result.history.requests),
            ("message", result.snapshot.messages),
            ("run", result.snapshot.runs),
        ):
            for item in items:
                out.write(json.dumps({kind: dataclasses.asdict(item)}, default=str) + "\n")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _server_envs(config: ChaosConfig, ports: list[int]) -> list[dict[str, str]]:
    envs = []
    for index in range(config.servers):
        pg_port, redis_port = ports[2 * index], ports[2 * index + 1]
        envs.append(
            server_env(
                f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
                f"redis://127.0.0.1:{redis_port}/0",
                lease_ttl_ms=config.lease_ttl_ms,
                echo_delay_ms=config.echo_delay_ms[index % len(config.echo_delay_ms)],
                redis_timeout_s=config.redis_timeout_s,
                pool_max_size=8,
            )
        )
    return envs


async def _create_sessions(url: str, config: ChaosConfig) -> tuple[list[UUID], list[UUID]]:
    store = await PostgresStore.connect(url, min_size=1, max_size=4)
    try:
        await store.migrate()
        made = [
            (await store.create_session("echo", user_id=USER_ID)).id
            for _ in range(config.sessions + config.servers)
        ]
    finally:
        await store.aclose()
    return made[: config.sessions], made[config.sessions :]


@contextlib.asynccontextmanager
async def _reader(url: str) -> Any:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


# The SQL twin of ``checker.answers``: a run answers its messages when it succeeded, or failed
# (answered by failure; docs/architecture.md).
ANSWERING = "r.status IN ('succeeded', 'failed')"
UNANSWERED = f"""
SELECT m.session_id, m.id FROM messages m JOIN sessions s ON s.id = m.session_id
WHERE s.user_id = $1 AND m.role = 'user' AND NOT EXISTS (
    SELECT 1 FROM runs r WHERE r.message_ids @> ARRAY[m.id] AND {ANSWERING})
"""
UNFINISHED_RUNS = """
SELECT count(*) FROM runs r JOIN sessions s ON s.id = r.session_id
WHERE s.user_id = $1 AND r.status IN ('queued', 'running')
"""


async def _settle(db: asyncpg.Pool, settle_s: float) -> list[str]:
    """Wait until nothing is unfinished or unanswered (bounded); what stays unanswered."""
    deadline = time.monotonic() + settle_s
    while True:
        unanswered = await db.fetch(UNANSWERED, USER_ID)
        unfinished = await db.fetchval(UNFINISHED_RUNS, USER_ID)
        if (not unanswered and not unfinished) or time.monotonic() >= deadline:
            return [f"message {row['id']} of session {row['session_id']}" for row in unanswered]
        await asyncio.sleep(0.25)


async def _final_round(db: asyncpg.Pool, client: Client, rng: random.Random) -> None:
    waiting = sorted({row["session_id"] for row in await db.fetch(UNANSWERED, USER_ID)})
    await asyncio.gather(
        *(
            client.send(sid, client.content("final", sid), rng.randrange(len(client.urls)), "final")
            for sid in waiting
        )
    )


def _figures(
    history: History,
    snapshot: Snapshot,
    report: Report,
    bursts: int,
    stranded: list[str],
    elapsed_s: float,
) -> dict[str, Any]:
    requests = history.requests
    outcomes = Counter(
        f"{r.status} {r.code}" if r.status and not r.ok else ("2xx" if r.ok else r.error)
        for r in requests
    )
    return {
        "commit": _commit(),
        "wall_clock_s": round(elapsed_s, 1),
        "sessions_used": len({r.session_id for r in requests}),
        "bursts": bursts,
        "requests": len(requests),
        "requests_by_kind": dict(Counter(r.kind for r in requests)),
        "answered_2xx": sum(r.ok for r in requests),
        "outcomes": dict(outcomes.most_common()),
        "faults": dict(Counter(f.kind for f in history.faults)),
        "fault_log": [f"{f.kind} {f.end - f.start:.1f}s: {f.detail}" for f in history.faults],
        "messages_stored": sum(m.role == "user" for m in snapshot.messages),
        "replies_stored": sum(m.role == "assistant" for m in snapshot.messages),
        "runs_by_status": dict(Counter(r.status for r in snapshot.runs)),
        "failed_runs_by_status": dict(Counter(status for status in _failed(history, snapshot))),
        "stranded_after_settle": len(stranded),
        "stranded_examples": stranded[:5],
        "takeover_max_s": round(max(report.takeover_s, default=0.0), 2),
        "recovery_max_s": round(max(report.recovery_s, default=0.0), 2),
        "outage_503_max_s": round(max(report.outage_503_s, default=0.0), 2),
    }


def _failed(history: History, snapshot: Snapshot) -> list[str]:
    """The stored status of each run an error response named (502/504 carry the run id)."""
    named = {r.run_id for r in history.requests if not r.ok and r.run_id is not None}
    return [run.status for run in snapshot.runs if run.id in named]


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    # The server code measured is src/ as of its last commit, unless the tree changed it.
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "src") else ""
    src = git("log", "-1", "--format=%h", "--", "src")
    return f"{git('rev-parse', '--short', 'HEAD')} (src {src}{dirty})"
