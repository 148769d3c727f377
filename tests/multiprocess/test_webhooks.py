"""Background runs and webhooks through real ``threadline serve`` processes: one process on
each store, and three processes sharing PostgreSQL and Redis where the process that owes a
delivery is killed (SIGKILL) mid-send and another one delivers it.

The receiver runs in the test process on 127.0.0.1; it holds a request open (``hang``) to
catch a delivery in flight.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest

from tests.multiprocess.conftest import (
    SEPARATOR,
    Gate,
    MakeSession,
    Server,
    post,
    server_env,
    start_servers,
    wait_until,
)
from tests.redis_topologies import Topology
from tests.webhook_receiver import running_receiver

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

SECRET = "mp-webhook-secret"
WEBHOOKS = {
    "webhook_secret": SECRET,
    "webhook_allowed_hosts": "127.0.0.1",
    # A killed sender's lease runs out after 2 x timeout + 1 s.
    "webhook_timeout_s": 1,
    "webhook_retry_initial_s": 0.05,
    "webhook_retry_max_s": 0.2,
    "webhook_poll_interval_s": 0.1,
}

REDIS_MODES = ("standalone", "cluster", "sentinel")


async def message_state(client: httpx.AsyncClient, server: Server, message_id: str) -> Any:
    r = await client.get(f"{server.url}/api/v1/messages/{message_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def delivery_of(client: httpx.AsyncClient, server: Server, session_id: str) -> Any:
    r = await client.get(f"{server.url}/api/v1/deliveries", params={"page_size": 500})
    assert r.status_code == 200, r.text
    found = [d for d in r.json()["deliveries"] if d["session_id"] == session_id]
    return found[0] if found else None


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@pytest.mark.timeout(60)
async def test_one_server_answers_in_the_background_and_delivers_after_a_failure(
    store: str, request: pytest.FixtureRequest, workdir: Path
) -> None:
    if store == "postgres":
        database = str(request.getfixturevalue("pg_dsn"))
    else:
        database = f"sqlite:///{workdir}/webhooks-{uuid4().hex}.db"
    env = server_env(database, "", **WEBHOOKS)
    del env["THREADLINE_REDIS_URL"]  # one process: in-process coordination
    async with running_receiver(["fail", "ok"]) as receiver:
        (server,) = await start_servers(1, env, workdir, f"hooks-{store}")
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(
                    f"{server.url}/api/v1/agent/echo/run",
                    json={
                        "message_content": "in the background",
                        "background": True,
                        "webhook_url": receiver.url(),
                    },
                )
                assert r.status_code == 202, r.text
                accepted = r.json()
                attempts = [await receiver.next(), await receiver.next()]

                async def delivered() -> bool:
                    found = await delivery_of(client, server, accepted["session_id"])
                    return found is not None and found["status"] == "delivered"

                await wait_until(delivered)
                state = await message_state(client, server, accepted["message_id"])
        finally:
            await server.child.stop()

    assert [a.action for a in attempts] == ["fail", "ok"], server.child.logs()
    assert attempts[0].delivery_id == attempts[1].delivery_id
    assert all(a.verifies(SECRET) for a in attempts)
    assert attempts[1].payload["message_ids"] == [accepted["message_id"]]
    assert attempts[1].payload["reply"]["message"] == "echo: in the background"
    assert state["status"] == "answered"
    assert state["reply"]["message"] == "echo: in the background"


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(90)
async def test_a_delivery_owed_by_a_killed_process_is_delivered_by_another(
    pg_dsn: str, topology: Topology, workdir: Path, db: asyncpg.Pool
) -> None:
    env = server_env(pg_dsn, topology, lease_ttl_ms=1000, **WEBHOOKS)
    async with running_receiver(["hang", "ok"]) as receiver:
        servers = await start_servers(3, env, workdir, "hooks-kill")
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(
                    f"{servers[1].url}/api/v1/agent/echo/run",
                    json={
                        "message_content": "deliver me",
                        "background": True,
                        "webhook_url": receiver.url(),
                    },
                )
                assert r.status_code == 202, r.text
                accepted = r.json()
                held = await receiver.next()
                # The delivery is in flight: its row names the process that holds its lease.
                owner = await db.fetchval(
                    "SELECT lease_owner FROM deliveries WHERE id = $1", UUID(held.delivery_id)
                )
                pid = int(owner.split(":")[1])
                (victim,) = [s for s in servers if s.child.process.pid == pid]
                await victim.child.stop(signal.SIGKILL)

                again = await receiver.next()
                survivors = [s for s in servers if s is not victim]

                async def delivered() -> bool:
                    found = await delivery_of(client, survivors[0], accepted["session_id"])
                    return found is not None and found["status"] == "delivered"

                await wait_until(delivered)
                row = await delivery_of(client, survivors[0], accepted["session_id"])
                state = await message_state(client, survivors[1], accepted["message_id"])
        finally:
            await asyncio.gather(*(s.child.stop() for s in servers))

    logs = "\n".join(s.child.logs() for s in servers)
    assert (held.action, again.action) == ("hang", "ok"), logs
    # At least once: the receiver saw the same delivery twice and dedupes on its id.
    assert again.delivery_id == held.delivery_id
    assert again.body == held.body
    assert again.verifies(SECRET)
    assert again.payload["message_ids"] == [accepted["message_id"]]
    assert (row["attempts"], row["last_status_code"]) == (2, 200)
    assert state["status"] == "answered"


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_a_background_message_at_another_process_merges_into_the_owners_run(
    pg_dsn: str, topology: Topology, workdir: Path, gate: Gate, make_session: MakeSession
) -> None:
    """The remote path: stored by a process that does not own the session, nudged to the owner,
    and answered there although nobody waits for it at either process."""
    env = server_env(pg_dsn, topology, **WEBHOOKS)
    async with running_receiver() as receiver:
        owner, other = await start_servers(2, env, workdir, "hooks-remote")
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                sid = (await make_session("gated")).id
                first = post(client, owner, sid, f"first\n{gate.line()}", "gated")
                await gate.next()  # the owner's model call is in flight
                r = await client.post(
                    f"{other.url}/api/v1/agent/gated/run",
                    json={
                        "message_content": f"second\n{gate.line()}",
                        "session_id": str(sid),
                        "background": True,
                        "webhook_url": receiver.url(),
                    },
                )
                assert r.status_code == 202, r.text
                merged = await gate.next()  # the owner cancelled its run and merged
                merged.release()
                answer = (await first).json()
                got = await receiver.next()
                state = await message_state(client, other, r.json()["message_id"])

                async def delivered() -> bool:
                    found = await delivery_of(client, other, str(sid))
                    return found is not None and found["status"] == "delivered"

                await wait_until(delivered)
        finally:
            await asyncio.gather(*(s.child.stop() for s in (owner, other)))

    reply = f"echo: first\n{gate.line()}{SEPARATOR}second\n{gate.line()}"
    assert merged.prompt == reply.removeprefix("echo: ")
    assert answer["message"] == reply
    # One delivery (only the second message asked for one), listing both messages it answered.
    assert got.payload["message_ids"] == answer["message_ids"]
    assert got.payload["message_ids"][1] == r.json()["message_id"]
    assert got.payload["reply"]["message"] == reply
    assert got.verifies(SECRET)
    assert state["status"] == "answered"
    assert state["message_ids"] == answer["message_ids"]
