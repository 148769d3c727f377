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
    MakeSession,
    describe,
    history,
    post,
    runs,
    server_env,
    start_servers,
    wait_until,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]


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
    pg_dsn: str, redis_dsn: str, workdir: Path, db: asyncpg.Pool, make_session: MakeSession
) -> None:
    # A short lease, so that the takeover comes quickly after the kill.
    env = server_env(pg_dsn, redis_dsn, lease_ttl_ms=1000)
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
