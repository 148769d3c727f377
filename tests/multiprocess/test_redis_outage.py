"""Redis goes away under two server processes, then comes back (empty: no persistence).

The test owns its Redis, in each mode: a standalone ``redis-server``; a 3-master Redis
Cluster whose every node is killed and started again (each finds its ``nodes.conf``, so the
cluster forms again, empty); a master, its replica and three sentinels, all killed and started
again (the sentinels from the configuration they rewrote). While it is down, requests fail
fast with 503 and store nothing; a run already in flight still finishes and every caller
already accepted is answered, including the one waiting at the process that does not run the
session, whose answer could not be published; once Redis is back, both processes listen again
(in a cluster, each on the shard that owns its channel) and bursts across processes work
again.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.multiprocess.conftest import (
    SEPARATOR,
    Gate,
    MakeSession,
    Server,
    assert_one_runner,
    history,
    listeners,
    post,
    runs,
    server_env,
    start_servers,
    stored,
    user_messages,
    wait_until,
)
from tests.redis_topologies import (
    Mode,
    Topology,
    start_cluster,
    start_sentinel,
    start_standalone,
)
from threadline.coordination import keys
from threadline.coordination.connection import Client, ready

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]


async def node(client: httpx.AsyncClient, server: Server) -> str:
    """The server's coordinator node id, as it appears in Redis."""
    metrics = (await client.get(f"{server.url}/debug/metrics")).json()
    return str(metrics["coordinator"]["node"])


async def subscribed(redis: Client, client: httpx.AsyncClient, servers: list[Server]) -> bool:
    """Whether every server listens again on its own channel (where its answers come too)."""
    channels = [keys.node_channel(await node(client, s)) for s in servers]
    return await listeners(redis, *channels) == dict.fromkeys(channels, 1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["standalone", "cluster", "sentinel"])
async def test_redis_outage_fails_fast_loses_nothing_and_recovers(
    mode: Mode,
    pg_dsn: str,
    workdir: Path,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    start = {"standalone": start_standalone, "cluster": start_cluster, "sentinel": start_sentinel}[
        mode
    ]
    topology: Topology = await asyncio.to_thread(start, workdir / f"outage-{mode}")
    # The run in flight across the outage is superseded by the burst's second half after it:
    # MERGE_MAX_WAIT_MS must outlast the outage (in Sentinel mode each refused request waits
    # out REDIS_TIMEOUT_S, 2 s, for the sentinels), or the second half waits behind a run that
    # never ends (the burst agent answers only a complete burst).
    env = server_env(pg_dsn, topology, lease_ttl_ms=1000, merge_max_wait_ms=120_000)
    servers: list[Server] = []
    redis = topology.client()
    try:
        await ready(redis)
        servers = await start_servers(2, env, workdir, f"outage-{mode}")
        owner, other = servers
        # ``finished``: its run ends during the outage. ``spanning``: its run is in flight
        # across the outage. ``fresh``: first used during the outage.
        finished = (await make_session("gated")).id
        spanning = (await make_session()).id
        fresh = (await make_session()).id
        halves = [f"part {i}/2 of spanning-{spanning}" for i in (1, 2)]
        async with httpx.AsyncClient(timeout=60) as client:
            # A run at the owner answers a caller there and one at the other process.
            first = post(client, owner, finished, f"first\n{gate.line()}", "gated")
            call = await gate.next()
            second = post(client, other, finished, f"second\n{gate.line()}", "gated")
            await call.cancelled()
            merged = await gate.next()
            assert merged.prompt == f"first\n{gate.line()}{SEPARATOR}second\n{gate.line()}"
            spanning_first = post(client, owner, spanning, halves[0])
            await wait_until(lambda: stored(db, spanning, 1), [spanning_first])

            await asyncio.to_thread(topology.stop)

            # Every new message fails fast, at either process, and nothing of it is stored.
            for server in servers:
                for sid, agent in ((finished, "gated"), (spanning, "burst"), (fresh, "burst")):
                    refused = await post(client, server, sid, f"lost?\n{gate.line()}", agent)
                    assert refused.status_code == 503, (refused.text, server.child.logs())
                    assert refused.json()["error"]["code"] == "coordinator_unavailable"
            assert [await user_messages(db, sid) for sid in (finished, spanning, fresh)] == [
                2,
                1,
                0,
            ]
            assert not any(c.done() for c in (first, second, spanning_first))

            # A run in flight needs no Redis to finish; its caller at the owner hears back.
            merged.release()
            answered = await first
            assert answered.status_code == 200, answered.text
            reply = answered.json()
            assert reply["message"] == f"echo: {merged.prompt}"

            await asyncio.to_thread(topology.restart)
            # The other process missed the answer published during the outage and finds it in
            # the store once it can take the session over.
            late = await second
            assert late.status_code == 200, late.text
            assert (late.json()["message"], late.json()["run_id"]) == (
                reply["message"],
                reply["run_id"],
            )
            # Having nothing left to run there, that process lets the session go again.
            await wait_until(lambda: _leased(redis, finished, None))

            # Redis came back empty. The owner takes back the lease of the session it still
            # runs, and both processes listen again; then the burst that spans the outage
            # completes across processes, and so does one on a session first used meanwhile.
            owner_node = (await node(client, owner)).encode()
            await wait_until(lambda: _leased(redis, spanning, owner_node), [spanning_first])
            await wait_until(lambda: subscribed(redis, client, servers))
            spanning_second = post(client, other, spanning, halves[1])
            parts = [f"part {i}/2 of fresh-{fresh}" for i in (1, 2)]
            fresh_first = post(client, other, fresh, parts[0])
            await wait_until(lambda: stored(db, fresh, 1), [fresh_first])
            fresh_second = post(client, owner, fresh, parts[1])
            responses = await asyncio.gather(
                spanning_first, spanning_second, fresh_first, fresh_second
            )
            bodies = [r.json() for r in responses]
            assert [r.status_code for r in responses] == [200] * 4, bodies
            assert [b["message"] for b in bodies] == [
                *["echo: " + SEPARATOR.join(halves)] * 2,
                *["echo: " + SEPARATOR.join(parts)] * 2,
            ]

            # Nothing accepted was lost or answered twice.
            messages = await history(client, other, finished)
            assert [m["role"] for m in messages] == ["user", "user", "assistant"]
            assert messages[-1]["content"] == reply["message"]
            assert_one_runner(await runs(db, finished), reply["run_id"])
            assert_one_runner(await runs(db, spanning), bodies[0]["run_id"])
            assert_one_runner(await runs(db, fresh), bodies[2]["run_id"])
            for sid in (spanning, fresh):
                roles = [m["role"] for m in await history(client, owner, sid)]
                assert roles == ["user", "user", "assistant"]
    finally:
        await redis.aclose()
        await asyncio.gather(*(s.child.stop() for s in servers))
        await asyncio.to_thread(topology.stop)


async def _leased(redis: Client, session_id: uuid.UUID, owner: bytes | None) -> bool:
    """Whether node ``owner`` holds the session's lease (None: nobody does)."""
    token = await redis.get(keys.lease(session_id))  # b"node:generation"
    return (token.split(b":")[0] if token is not None else None) == owner
