"""A failover under load: a master is killed (SIGKILL) while two server processes answer a
steady load over many sessions, and a replica takes its place; the load goes on.

* Sentinel: one master and its replica; the sentinels promote the replica and the servers
  find it through them.
* Cluster: three masters with a replica each; the dead master's replica wins the election for
  its slots, and the servers' cluster clients follow the new slot map.

Checked afterwards from PostgreSQL with the chaos checker (``tests/chaos/checker.py``): no
message lost, none stored twice, none answered twice, every caller got a defined answer (a
success, or a 503 ``coordinator_unavailable`` while there was no master), none hung, and the
servers answered again within the recovery bound once a master was back. The topology is
the test's own: the session's shared ones keep their masters.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from functools import partial
from pathlib import Path

import asyncpg
import pytest

from tests.chaos.checker import Limits, check
from tests.chaos.history import Fault, History, snapshot
from tests.chaos.load import Client, LoadConfig, run_load
from tests.chaos.soak import ANSWERING
from tests.multiprocess.conftest import server_env, start_servers
from tests.redis_topologies import (
    Mode,
    Node,
    Topology,
    cluster_masters,
    start_cluster,
    start_sentinel,
)
from threadline.store import PostgresStore

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.allow_blocking,  # starts and kills the topology's redis-servers
]

SESSIONS = 40
LEASE_TTL_MS = 2000
REDIS_TIMEOUT_S = 1.0
ECHO_DELAY_MS = 20
LOAD_BEFORE_S = 3.0
LOAD_AFTER_S = 5.0
SETTLE_S = 15.0
# The Redis calls a request can make before it is refused, each bounded by REDIS_TIMEOUT_S: on
# a session another process owns, the claim, the in-flight entry, and the nudge after the
# insert (coordination/leases.py). A Sentinel master takes each as one pipeline; a cluster
# takes the LIST and the script of the claim and of the nudge (with the unlisting) one call at
# a time, as their keys sit in different slots. In a failover a call can succeed slowly and a
# later one fail: a request refused at its nudge on a cluster took 3.0 s, more than the two
# calls' worth (2 s + 1 s of slack) this test allowed.
REDIS_CALLS = {"sentinel": 3, "cluster": 6}

UNANSWERED = f"""
SELECT m.session_id FROM messages m JOIN sessions s ON s.id = m.session_id
WHERE s.user_id = $1 AND m.role = 'user' AND NOT EXISTS (
    SELECT 1 FROM runs r WHERE r.message_ids @> ARRAY[m.id] AND {ANSWERING})
"""
UNFINISHED = """
SELECT count(*) FROM runs r JOIN sessions s ON s.id = r.session_id
WHERE s.user_id = $1 AND r.status IN ('queued', 'running')
"""


def master_of(topology: Topology) -> Node:
    """The master to kill: Sentinel's, or the first of the cluster's."""
    if topology.mode == "cluster":
        return cluster_masters(topology)[0]
    return topology.master()


async def promoted(topology: Topology, old: Node) -> None:
    """Wait until a replica has taken the killed master's place and answers as master."""
    while True:
        await asyncio.sleep(0.1)
        if await asyncio.to_thread(_replaced, topology, old):
            return


def _replaced(topology: Topology, old: Node) -> bool:
    try:
        if topology.mode == "cluster":
            masters = cluster_masters(topology)
            return len(masters) == 3 and old not in masters
        return topology.master().port != old.port
    except Exception:
        return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
async def test_a_failover_mid_load_loses_nothing_and_answers_nothing_twice(
    mode: Mode,
    pg_dsn: str,
    workdir: Path,
    db: asyncpg.Pool,
    store: PostgresStore,
    tmp_path: Path,
) -> None:
    start = start_sentinel if mode == "sentinel" else partial(start_cluster, replicas=1)
    topology = await asyncio.to_thread(start, tmp_path / mode)
    user_id = f"failover-{uuid.uuid4().hex}"
    servers = []
    client: Client | None = None
    history = History()
    try:
        sessions = [
            (await store.create_session("echo", user_id=user_id)).id for _ in range(SESSIONS)
        ]
        env = server_env(
            pg_dsn,
            topology,
            lease_ttl_ms=LEASE_TTL_MS,
            redis_timeout_s=REDIS_TIMEOUT_S,
            echo_delay_ms=ECHO_DELAY_MS,
        )
        servers = await start_servers(2, env, workdir, f"failover-{mode}")
        client = Client([s.url for s in servers], history, timeout_s=30.0)
        stop = asyncio.Event()
        rng = random.Random(13)
        load = asyncio.create_task(run_load(client, sessions, LoadConfig(workers=8), rng, stop))
        await asyncio.sleep(LOAD_BEFORE_S)  # the load runs meanwhile
        assert not load.done()

        old = master_of(topology)
        began = time.time()
        old.kill(signal.SIGKILL)
        await promoted(topology, old)
        history.faults.append(
            Fault("redis", began, time.time(), detail=f"{mode}: master killed, replica promoted")
        )
        await asyncio.sleep(LOAD_AFTER_S)
        stop.set()
        bursts = await load

        # Quiescence, then one more message to any session left with unanswered ones (its
        # next run answers everything before it), as the chaos run does.
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            if not await db.fetch(UNANSWERED, user_id) and not await db.fetchval(
                UNFINISHED, user_id
            ):
                break
            await asyncio.sleep(0.25)
        waiting = sorted({row["session_id"] for row in await db.fetch(UNANSWERED, user_id)})
        await asyncio.gather(
            *(client.send(sid, client.content("final", sid), 0, "final") for sid in waiting)
        )
        found = await snapshot(db, user_id)
    finally:
        if client is not None:
            await client.aclose()
        # Everything but the INFO lines (warnings, errors and their tracebacks), from the
        # start: the last lines alone would miss what happened at the failover.
        logs = "\n".join(
            f"--- {s.name} ---\n" + "".join(line for line in s.child.output if " INFO " not in line)
            for s in servers
        )
        await asyncio.gather(*(s.child.stop() for s in servers))
        await asyncio.to_thread(topology.stop)

    limits = Limits(
        lease_ttl_s=LEASE_TTL_MS / 1000,
        model_call_s=ECHO_DELAY_MS / 1000,
        fast_503_s=REDIS_CALLS[mode] * REDIS_TIMEOUT_S + 1.0,
        recovery_s=10.0,
    )
    report = check(history, found, limits)
    violations = {name: lines[:5] for name, lines in report.violations.items() if lines}
    assert report.ok, f"{violations}\n{logs}"
    print(  # the figures, with -s
        f"failover in {history.faults[0].end - history.faults[0].start:.1f}s; "
        f"{len(history.requests)} requests in {bursts} bursts: "
        f"{sum(r.ok for r in history.requests)} answered, "
        f"{sum(r.status == 503 for r in history.requests)} refused with 503"
    )
    after = [r for r in history.requests if r.start > history.faults[0].end and r.ok]
    assert after, "no request succeeded after the failover"
