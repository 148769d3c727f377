"""What reaches each process over Redis pub/sub: only what concerns it.

Two real server processes share PostgreSQL and Redis. Each session's owner is the process its
first message reached (held there by the gate of ``tests/mp_agents.py``); callers and
watchers sit at one process or the other. Each server counts the pub/sub messages it
publishes and receives, by kind (``/debug/metrics``, ``coordinator.pubsub_*``), and Redis
says who listens to which channel (``PUBSUB NUMSUB``). With the answers
broadcast to every process, or the events listened to by pattern, every count below would be
higher.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from httpx_sse import aconnect_sse

from tests.multiprocess.conftest import (
    Gate,
    MakeSession,
    Server,
    listeners,
    post,
    running_servers,
    server_env,
    stored,
    wait_until,
)
from tests.redis_topologies import Topology
from threadline.coordination import keys
from threadline.coordination.connection import Client, ready

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]


REDIS_MODES = ("standalone", "sentinel", "cluster")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(pg_dsn: str, topology: Topology, workdir: Path) -> AsyncIterator[list[Server]]:
    env = server_env(pg_dsn, topology)
    async with running_servers(2, env, workdir, f"routing-{topology.mode}") as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def redis(topology: Topology) -> AsyncIterator[Client]:
    opened = topology.client()
    try:
        await ready(opened)  # a cluster client learns the slot map
        yield opened
    finally:
        await opened.aclose()


async def coordinator(client: httpx.AsyncClient, server: Server) -> dict[str, Any]:
    found: dict[str, Any] = (await client.get(f"{server.url}/debug/metrics")).json()["coordinator"]
    return found


class Traffic:
    """A server's pub/sub counts since the traffic was first read."""

    def __init__(self, client: httpx.AsyncClient, server: Server) -> None:
        self._client = client
        self._server = server
        self._start: dict[str, Counter[str]] = {}

    async def _read(self) -> dict[str, Counter[str]]:
        found = await coordinator(self._client, self._server)
        return {d: Counter(found[f"pubsub_{d}"]) for d in ("published", "received")}

    async def start(self) -> None:
        self._start = await self._read()

    async def since(self, direction: str) -> dict[str, int]:
        now = await self._read()
        delta = now[direction] - self._start[direction]
        return dict(delta)


@pytest.mark.timeout(30)
async def test_each_process_receives_only_the_answers_its_own_callers_wait_for(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    a, b = servers
    traffic = {s.name: Traffic(client, s) for s in servers}
    for t in traffic.values():
        await t.start()
    at_a, at_b = (await make_session("gated")).id, (await make_session("gated")).id
    # Each session's first message at its owner, its run held at the gate...
    first_a = post(client, a, at_a, f"a1\n{gate.line()}", "gated")
    first_b = post(client, b, at_b, f"b1\n{gate.line()}", "gated")
    held = [await gate.next(), await gate.next()]
    # ...then one at the other process, queued behind that run: its caller waits there.
    away_a = post(client, b, at_a, f"a2\n{gate.line()}", "gated", strategy="enqueue")
    away_b = post(client, a, at_b, f"b2\n{gate.line()}", "gated", strategy="enqueue")
    callers = [first_a, first_b, away_a, away_b]
    await wait_until(lambda: stored(db, at_a, 2), callers)
    await wait_until(lambda: stored(db, at_b, 2), callers)

    async def nudged(server: Server) -> bool:
        return (await traffic[server.name].since("received")).get("nudge") == 1

    # Each owner has its nudge (so the queued message is its to run, not the other's).
    await wait_until(lambda: nudged(a), callers)
    await wait_until(lambda: nudged(b), callers)
    for call in held:
        call.release()
    for call in [await gate.next(), await gate.next()]:
        assert "2\n" in call.prompt  # the queued messages' runs
        call.release()
    responses = await asyncio.gather(*callers)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert responses[2].json()["message"].startswith("echo: a2")
    assert responses[3].json()["message"].startswith("echo: b2")

    for server in servers:
        # Out: one nudge, and one answer, to the one process where its caller waits (counted
        # once Redis replied, which may be just after that caller had it).
        async def sent(server: Server = server) -> bool:
            published = await traffic[server.name].since("published")
            return (published.get("nudge"), published.get("answer")) == (1, 1)

        await wait_until(sent)
        # In: one nudge (the other's message for our session), one answer (for our caller
        # of the other's session), no events (nobody watches here).
        received = await traffic[server.name].since("received")
        assert received == {"nudge": 1, "answer": 1}, (server.name, received)


@pytest.mark.timeout(30)
async def test_each_process_listens_to_a_sessions_events_only_while_it_watches_it(
    servers: list[Server],
    client: httpx.AsyncClient,
    redis: Client,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    a, b = servers
    nodes = {s.name: (await coordinator(client, s))["node"] for s in servers}
    node_channels = [keys.node_channel(n) for n in nodes.values()]
    assert await listeners(redis, *node_channels) == dict.fromkeys(node_channels, 1)
    traffic = {s.name: Traffic(client, s) for s in servers}
    for t in traffic.values():
        await t.start()
    at_a, at_b = (await make_session("streamed")).id, (await make_session("streamed")).id
    url = "/api/v1/agent/streamed/run"

    async def stream(server: Server, sid: uuid.UUID, started: asyncio.Event) -> list[str]:
        """A streamed message at ``server`` (which owns ``sid`` then): the SSE event kinds."""
        body = {"message_content": f"words\n{gate.line()}", "session_id": str(sid)}
        kinds: list[str] = []
        async with aconnect_sse(
            client, "POST", f"{server.url}{url}", json={**body, "stream": True}
        ) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                kinds.append(sse.event)
                started.set()
        return kinds

    started = [asyncio.Event(), asyncio.Event()]
    streams = [
        asyncio.create_task(stream(a, at_a, started[0])),
        asyncio.create_task(stream(b, at_b, started[1])),
    ]
    held = [await gate.next(), await gate.next()]
    await asyncio.gather(*(e.wait() for e in started))

    # Both runs in flight, each watched at its own process only.
    here_a = set((await coordinator(client, a))["channels"])
    here_b = set((await coordinator(client, b))["channels"])
    assert here_a == {keys.node_channel(nodes[a.name]), keys.events_channel(at_a)}
    assert here_b == {keys.node_channel(nodes[b.name]), keys.events_channel(at_b)}
    watched = [keys.events_channel(at_a), keys.events_channel(at_b)]
    assert await listeners(redis, *watched) == dict.fromkeys(watched, 1)

    for call in held:
        call.release()
    kinds = await asyncio.gather(*streams)
    assert all(k[-1] == "run.completed" for k in kinds), kinds

    # Watchers gone, subscriptions gone.
    async def unwatched() -> bool:
        return await listeners(redis, *watched) == dict.fromkeys(watched, 0)

    await wait_until(unwatched)
    assert set((await coordinator(client, a))["channels"]) == {node_channels[0]}
    assert set((await coordinator(client, b))["channels"]) == {node_channels[1]}
    for server, sid in ((a, at_a), (b, at_b)):
        logged = await redis.xlen(keys.events_log(sid))

        async def sent(server: Server = server, logged: int = logged) -> bool:
            return await traffic[server.name].since("published") == {"event": logged}

        await wait_until(sent)  # counted once Redis replied
        # Every event of the session watched here, and nothing of the other's.
        received = await traffic[server.name].since("received")
        assert received == {"event": logged}, (server.name, received, logged)
