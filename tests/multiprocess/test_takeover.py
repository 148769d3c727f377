"""Crash recovery: the process running a session is killed (SIGKILL) mid-run; another one
takes the session over once the lease expires and answers what is unanswered."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.multiprocess.conftest import (
    SEPARATOR,
    Gate,
    MakeSession,
    describe,
    history,
    post,
    runs,
    server_env,
    start_servers,
    wait_until,
)
from tests.redis_topologies import Topology

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]
# The same tests against each Redis mode (tests/redis_topologies.py).
REDIS_MODES = ("standalone", "cluster", "sentinel")


async def running_run_answering(db: asyncpg.Pool, session_id: uuid.UUID, count: int) -> bool:
    """Whether a run answering ``count`` messages has been opened and not finished."""
    query = (
        "SELECT count(*) FROM runs WHERE session_id = $1 AND status = 'running'"
        " AND cardinality(message_ids) = $2"
    )
    found: int = await db.fetchval(query, session_id, count)
    return found > 0


@pytest.mark.timeout(60)
async def test_a_killed_owner_is_taken_over_and_nothing_is_lost_or_answered_twice(
    pg_dsn: str,
    topology: Topology,
    workdir: Path,
    db: asyncpg.Pool,
    make_session: MakeSession,
) -> None:
    # A short lease, so that the takeover comes quickly after the kill.
    env = server_env(pg_dsn, topology, lease_ttl_ms=1000)
    victim, survivor, other = await start_servers(3, env, workdir, "takeover")
    try:
        sid = (await make_session()).id
        parts = [f"part {i}/3 of crash-{sid}" for i in (1, 2, 3)]
        async with httpx.AsyncClient(timeout=60) as client:
            doomed = post(client, victim, sid, parts[0])
            await wait_until(lambda: running_run_answering(db, sid, 1), [doomed])
            waiting = post(client, survivor, sid, parts[1])
            # The victim owns the session: the message sent to the survivor reaches it and
            # its run now answers both messages.
            await wait_until(lambda: running_run_answering(db, sid, 2), [doomed, waiting])

            await victim.child.stop(signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                await doomed
            late = post(client, other, sid, parts[2])
            responses = await asyncio.gather(waiting, late)
            messages = await history(client, other, sid)
    finally:
        await asyncio.gather(*(s.child.stop() for s in (victim, survivor, other)))

    logs = "\n".join(s.child.logs() for s in (survivor, other))
    bodies = [r.json() for r in responses]
    assert [r.status_code for r in responses] == [200, 200], (bodies, logs)
    reply = "echo: " + SEPARATOR.join(parts)
    assert [b["message"] for b in bodies] == [reply, reply]
    assert bodies[0]["run_id"] == bodies[1]["run_id"]

    # Nothing lost, nothing answered twice: three messages, one reply answering all three.
    users = [m for m in messages if m["role"] == "user"]
    assert [m["content"] for m in users] == parts
    assert [m["role"] for m in messages] == ["user", "user", "user", "assistant"]
    assert messages[-1]["content"] == reply
    assert all(b["message_ids"] == [m["id"] for m in users] for b in bodies)

    # One completed model call. The victim's last run answered the first two messages and
    # was fenced out in PostgreSQL by the new owner's run: it stays "running" (nobody is left
    # to finish it) unless the store closes it as superseded when it opens the run that
    # fences it out. No run but the winner stored a reply.
    found = await runs(db, sid)
    winner = [r for r in found if r["status"] == "succeeded"]
    assert [str(r["id"]) for r in winner] == [bodies[0]["run_id"]], describe(found)
    assert list(winner[0]["message_ids"]) == [uuid.UUID(m["id"]) for m in users]
    others = [r for r in found if r["status"] != "succeeded"]
    assert {r["status"] for r in others} <= {"superseded", "running"}, describe(found)
    assert len([r for r in others if r["status"] == "running"]) <= 1, describe(found)
    assert all(r["reply_message_id"] is None for r in others), describe(found)
    assert any(len(r["message_ids"]) == 2 for r in others), describe(found)


@pytest.mark.timeout(60)
async def test_a_session_whose_callers_all_died_with_its_owner_is_still_answered(
    pg_dsn: str,
    topology: Topology,
    workdir: Path,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
) -> None:
    # Nobody waits for this session anywhere else: only the orphan sweep of the survivor's
    # watchdog can find it once the dead owner's lease has run out.
    env = server_env(pg_dsn, topology, lease_ttl_ms=1000)
    victim, survivor = await start_servers(2, env, workdir, "orphan")
    try:
        sid = (await make_session("gated")).id
        text = f"only caller dies\n{gate.line()}"
        async with httpx.AsyncClient(timeout=60) as client:
            doomed = post(client, victim, sid, text, "gated")
            first = await gate.next()  # the model call runs in the victim
            await victim.child.stop(signal.SIGKILL)
            await first.cancelled()
            with pytest.raises(httpx.TransportError):
                await doomed
            retried = await gate.next()  # the survivor took the session over
            assert retried.prompt == text
            retried.release()
            await wait_until(lambda: answered(db, sid), [])
            messages = await history(client, survivor, sid)
    finally:
        await asyncio.gather(*(s.child.stop() for s in (victim, survivor)))

    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", text),
        ("assistant", f"echo: {text}"),
    ]
    found = await runs(db, sid)
    assert [r["status"] for r in found].count("succeeded") == 1, describe(found)
    assert "running" not in [r["status"] for r in found], describe(found)


async def answered(db: asyncpg.Pool, session_id: uuid.UUID) -> bool:
    query = "SELECT count(*) FROM messages WHERE session_id = $1 AND role = 'assistant'"
    found: int = await db.fetchval(query, session_id)
    return found > 0
