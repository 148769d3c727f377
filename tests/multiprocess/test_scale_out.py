"""Three real server processes sharing PostgreSQL and Redis: one runner per session wherever
its messages arrive.

The servers start once for this module. Ordering across processes is controlled through the
models of ``tests/mp_agents.py``: a ``burst`` run completes only once its prompt holds every
part, a ``gated`` run only once the test opens its gate.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio

from tests.multiprocess.conftest import (
    SEPARATOR,
    Gate,
    MakeSession,
    Server,
    assert_one_runner,
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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(pg_dsn: str, topology: Topology, workdir: Path) -> AsyncIterator[list[Server]]:
    env = server_env(pg_dsn, topology)
    async with running_servers(3, env, workdir, f"scale-out-{topology.mode}") as started:
        yield started


@pytest.mark.timeout(60)
async def test_twenty_bursts_alternating_across_processes_get_one_model_call_each(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
) -> None:
    sessions = [(await make_session()).id for _ in range(20)]

    async def burst(k: int, sid: uuid.UUID) -> tuple[list[str], list[httpx.Response]]:
        parts = [f"part {i}/3 of burst-{k}-{sid}" for i in (1, 2, 3)]
        callers: list[asyncio.Task[httpx.Response]] = []
        for i, text in enumerate(parts):
            # Part i goes to another process than part i-1; it is sent once part i-1 is
            # stored, so the order of arrival (FIFO) is the order of the parts.
            callers.append(post(client, servers[(k + i) % len(servers)], sid, text))
            await wait_until(lambda n=i + 1: stored(db, sid, n), callers)
        return parts, list(await asyncio.gather(*callers))

    results = await asyncio.gather(*(burst(k, sid) for k, sid in enumerate(sessions)))

    for sid, (parts, responses) in zip(sessions, results, strict=True):
        bodies = [r.json() for r in responses]
        assert [r.status_code for r in responses] == [200, 200, 200], bodies
        reply = "echo: " + SEPARATOR.join(parts)
        assert [b["message"] for b in bodies] == [reply] * 3
        assert len({b["run_id"] for b in bodies}) == 1

        messages = await history(client, servers[0], sid)
        users = [m for m in messages if m["role"] == "user"]
        assert [m["content"] for m in users] == parts
        assert [m["role"] for m in messages] == ["user", "user", "user", "assistant"]
        assert [m["seq"] for m in messages] == [1, 2, 3, 4]
        assert messages[-1]["content"] == reply
        assert all(b["message_ids"] == [m["id"] for m in users] for b in bodies)
        assert_one_runner(await runs(db, sid), bodies[0]["run_id"])


@pytest.mark.timeout(30)
async def test_a_message_at_another_process_cancels_the_run_in_flight_and_merges(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    sid = (await make_session("gated")).id
    owner, other = servers[0], servers[1]
    first = post(client, owner, sid, f"first\n{gate.line()}", "gated")
    call = await gate.next()  # the model call is in flight in the owner's process
    assert call.prompt == f"first\n{gate.line()}"

    second = post(client, other, sid, f"second\n{gate.line()}", "gated")
    await call.cancelled()  # the owner's model call was cancelled by a message sent elsewhere
    merged = await gate.next()
    assert merged.prompt == f"first\n{gate.line()}{SEPARATOR}second\n{gate.line()}"
    merged.release()

    responses = await asyncio.gather(first, second)
    bodies = [r.json() for r in responses]
    assert [r.status_code for r in responses] == [200, 200], bodies
    assert bodies[0]["message"] == bodies[1]["message"] == f"echo: {merged.prompt}"
    assert bodies[0]["run_id"] == bodies[1]["run_id"]
    assert [b["superseded"] for b in bodies] == [True, False]
    found = await runs(db, sid)
    assert_one_runner(found, bodies[0]["run_id"])
    assert len(found) == 2
    assert {str(r["superseded_by"]) for r in found} == {bodies[0]["run_id"], "None"}


@pytest.mark.timeout(30)
async def test_enqueue_across_processes_answers_each_message_in_arrival_order(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    sid = (await make_session("gated")).id
    texts = [f"m{i}\n{gate.line()}" for i in range(3)]
    callers = [post(client, servers[0], sid, texts[0], "gated", strategy="enqueue")]
    call = await gate.next()
    for i, server in ((1, servers[1]), (2, servers[2])):
        callers.append(post(client, server, sid, texts[i], "gated", strategy="enqueue"))
        await wait_until(lambda n=i + 1: stored(db, sid, n), callers)

    prompts = [call.prompt]
    call.release()
    for _ in range(2):
        call = await gate.next()
        prompts.append(call.prompt)
        call.release()

    assert prompts == texts  # one run per message, in the order they were stored
    bodies = [r.json() for r in await asyncio.gather(*callers)]
    assert [b["message"] for b in bodies] == [f"echo: {t}" for t in texts]
    assert len({b["run_id"] for b in bodies}) == 3
    messages = await history(client, servers[2], sid)
    # All three were stored before the first reply, and the replies follow in the same order.
    assert [m["content"] for m in messages] == texts + [f"echo: {t}" for t in texts]


@pytest.mark.timeout(30)
async def test_reject_at_another_process_gets_409_and_stores_nothing(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    sid = (await make_session("gated")).id
    first = post(client, servers[0], sid, f"busy\n{gate.line()}", "gated")
    call = await gate.next()
    busy = await post(client, servers[1], sid, "hello?", "gated", strategy="reject")
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "session_busy"
    assert await user_messages(db, sid) == 1
    call.release()
    assert (await first).status_code == 200
