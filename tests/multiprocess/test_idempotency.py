"""Idempotency keys across three real server processes sharing PostgreSQL and Redis.

A repeat gets its message's answer wherever it arrives, promptly: the leases here outlive the
tests (``LEASE_TTL_MS`` 60 s), so an answer that only the watchdog would deliver never comes
within a test's timeout. Model calls are held with the ``gated`` agent's gate; a repeat is
known to wait once its process counts it (``repeats_waiting`` in /debug/metrics).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from tests.multiprocess.conftest import (
    Gate,
    MakeSession,
    Server,
    history,
    post,
    running_servers,
    runs,
    server_env,
    stored,
    user_messages,
    wait_until,
)
from tests.redis_topologies import Topology

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]
# The same tests against each Redis mode (tests/redis_topologies.py).
REDIS_MODES = ("standalone", "cluster", "sentinel")

REPLAYED = "Idempotent-Replayed"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(pg_dsn: str, topology: Topology, workdir: Path) -> AsyncIterator[list[Server]]:
    env = server_env(pg_dsn, topology, lease_ttl_ms=60_000)
    async with running_servers(3, env, workdir, f"idempotency-{topology.mode}") as started:
        yield started


async def repeats_waiting(
    client: httpx.AsyncClient, servers: Sequence[Server], count: int, callers: Sequence[Any]
) -> None:
    async def counted() -> bool:
        total = 0
        for server in servers:
            metrics = (await client.get(f"{server.url}/debug/metrics")).json()
            total += metrics["coordinator"]["repeats_waiting"]
        return total >= count

    await wait_until(counted, callers)


def keyed(
    client: httpx.AsyncClient, server: Server, sid: uuid.UUID, text: str, key: str, **extra: Any
) -> asyncio.Task[httpx.Response]:
    return post(client, server, sid, text, "gated", idempotency_key=key, **extra)


@pytest.mark.timeout(60)
async def test_one_key_sent_to_two_processes_at_once_stores_one_message(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    pairs = 6  # each pair of processes, both ways: whichever wins the insert
    sessions = [(await make_session("gated")).id for _ in range(pairs)]
    callers: list[tuple[asyncio.Task[httpx.Response], asyncio.Task[httpx.Response]]] = []
    for k, sid in enumerate(sessions):
        text = f"hello {k}\n{gate.line()}"
        one, other = servers[k % 3], servers[(k + 1 + k // 3) % 3]
        callers.append(
            (keyed(client, one, sid, text, "wamid.X"), keyed(client, other, sid, text, "wamid.X"))
        )
    calls = [await gate.next() for _ in sessions]  # one model call per session
    every = [c for pair in callers for c in pair]
    await repeats_waiting(client, servers, pairs, every)
    for call in calls:
        call.release()

    for sid, pair in zip(sessions, callers, strict=True):
        responses = await asyncio.gather(*pair)
        bodies = [r.json() for r in responses]
        assert [r.status_code for r in responses] == [200, 200], bodies
        assert bodies[0] == bodies[1]
        assert sorted(REPLAYED in r.headers for r in responses) == [False, True]
        assert await user_messages(db, sid) == 1
        messages = await history(client, servers[0], sid)
        assert [m["id"] for m in messages if m["role"] == "user"] == [bodies[0]["message_id"]]
        assert [(r["status"], str(r["id"])) for r in await runs(db, sid)] == [
            ("succeeded", bodies[0]["run_id"])
        ]
    assert gate.calls.empty()  # no session's model was called twice


async def blocked(db: asyncpg.Pool, count: int, callers: Sequence[Any]) -> None:
    """Wait until ``count`` backends of the database wait for a lock (see below)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND cardinality(pg_blocking_pids(pid)) > 0"
    )

    async def waiting() -> bool:
        return bool(await db.fetchval(query) >= count)

    await wait_until(waiting, callers)


@pytest.mark.timeout(60)
async def test_a_race_lost_away_from_the_owner_joins_the_owners_run(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    """Both inserts wait behind the test's lock on the session row; the owner's queued first,
    so it wins, and the process that lost (having listed its insert in flight) must have the
    owner publish the answer of a message that owner's own caller waits for."""
    sid = (await make_session("gated")).id
    text = f"race\n{gate.line()}"
    async with db.acquire() as lock, lock.transaction():
        await lock.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", sid)
        owner = keyed(client, servers[0], sid, text, "k")
        await blocked(db, 1, [owner])  # claimed the lease, its insert waits
        other = keyed(client, servers[1], sid, text, "k")
        await blocked(db, 2, [owner, other])
    call = await gate.next()
    await repeats_waiting(client, servers[1:2], 1, [owner, other])
    call.release()

    original, repeated = await owner, await other
    assert original.status_code == repeated.status_code == 200, repeated.text
    assert repeated.json() == original.json()
    assert (REPLAYED in original.headers, repeated.headers[REPLAYED]) == (False, "true")
    assert await user_messages(db, sid) == 1
    assert gate.calls.empty()


@pytest.mark.timeout(60)
async def test_a_reject_repeat_at_another_process_joins_the_pending_run(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    sid = (await make_session("gated")).id
    text = f"working\n{gate.line()}"
    first = keyed(client, servers[0], sid, text, "k")
    call = await gate.next()
    busy = await post(client, servers[1], sid, "new", "gated", strategy="reject")
    assert busy.status_code == 409, busy.text  # a new message is refused...
    repeat = keyed(client, servers[1], sid, text, "k", strategy="reject")
    await repeats_waiting(client, servers[1:2], 1, [first, repeat])  # ...a repeat joins
    call.release()

    original, repeated = await first, await repeat
    assert repeated.status_code == 200, repeated.text
    assert repeated.json() == original.json()
    assert repeated.headers[REPLAYED] == "true"
    assert await user_messages(db, sid) == 1
    later = await keyed(client, servers[2], sid, text, "k")  # answered: from the store
    assert later.json() == original.json()
    assert later.headers[REPLAYED] == "true"
    assert gate.calls.empty()


@pytest.mark.timeout(60)
async def test_a_repeat_at_the_owner_of_a_message_sent_elsewhere_joins_without_superseding(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    sid = (await make_session("gated")).id
    owner, other = servers[0], servers[1]
    first = post(client, owner, sid, f"first\n{gate.line()}", "gated")
    running = await gate.next()  # the owner runs the session's first message
    text = f"second\n{gate.line()}"
    second = keyed(client, other, sid, text, "k", strategy="enqueue")
    await wait_until(lambda: stored(db, sid, 2), [first, second])
    repeat = keyed(client, owner, sid, text, "k", strategy="enqueue")
    await repeats_waiting(client, [owner], 1, [first, second, repeat])
    running.release()
    assert (await first).status_code == 200
    call = await gate.next()  # the second message's own run, after the first
    assert call.prompt == text
    call.release()

    original, repeated = await second, await repeat
    assert repeated.status_code == 200, repeated.text
    assert repeated.json() == original.json()
    assert original.json()["message"] == f"echo: {text}"
    assert await user_messages(db, sid) == 2
    found = await runs(db, sid)
    assert sorted(r["status"] for r in found) == ["succeeded", "succeeded"]
    assert all(r["superseded_by"] is None for r in found)
