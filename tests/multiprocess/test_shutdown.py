"""Stopping a real server process (SIGTERM) while callers wait for their replies.

Every caller still waiting once the runs' grace (``SHUTDOWN_GRACE_S``) is over gets the
documented 503 ``shutting_down``; before ``shutdown.py`` they got uvicorn's bare 500, because
uvicorn cancelled their requests before the app's lifespan drained the coordinator. The runs
are the ``gated`` agent's, held at the test's gate until the server gives up on them (it
closes their connection: ``GateCall.cancelled``), so no timing decides the outcome.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.multiprocess.conftest import (
    Gate,
    MakeSession,
    post,
    server_env,
    start_servers,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres]

AGENT = "gated"


def assert_shutting_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down", response.text


@pytest.mark.parametrize("coordinator", ["local", "redis"])
async def test_a_caller_waiting_when_its_server_stops_gets_503_shutting_down(
    coordinator: str,
    pg_dsn: str,
    redis_dsn: str,
    workdir: Path,
    gate: Gate,
    make_session: MakeSession,
) -> None:
    env = server_env(pg_dsn, redis_dsn, shutdown_grace_s=1)
    if coordinator == "local":
        del env["THREADLINE_REDIS_URL"]
    (server,) = await start_servers(1, env, workdir, f"shutdown-{coordinator}")
    try:
        session = await make_session(AGENT)
        async with httpx.AsyncClient(timeout=60) as client:
            waiting = post(client, server, session.id, f"{gate.line()}\nheld", agent=AGENT)
            call = await gate.next()
            stopping = asyncio.create_task(server.child.stop())
            await call.cancelled()  # the grace is over: the server gave up on the run
            response = await waiting
            await stopping
    finally:
        await server.child.stop()
    assert_shutting_down(response)
    assert server.child.process.returncode is not None
    assert "Exception in ASGI application" not in server.child.logs()


async def test_a_caller_waiting_for_another_process_run_gets_503_when_its_own_stops(
    pg_dsn: str, redis_dsn: str, workdir: Path, gate: Gate, make_session: MakeSession
) -> None:
    """The caller waits in its process's mailbox for a run the session's owner makes."""
    env = server_env(pg_dsn, redis_dsn, shutdown_grace_s=1)
    owner, other = await start_servers(2, env, workdir, "shutdown-remote")
    try:
        session = await make_session(AGENT)
        async with httpx.AsyncClient(timeout=60) as client:
            first = post(client, owner, session.id, f"{gate.line()}\nfirst", agent=AGENT)
            held = await gate.next()
            # Another process takes the second message; the owner supersedes its run and
            # answers both in one, which the test holds too.
            second = post(client, other, session.id, f"{gate.line()}\nsecond", agent=AGENT)
            await held.cancelled()
            merged = await gate.next()
            assert "first" in merged.prompt
            assert "second" in merged.prompt
            await other.child.stop()
            assert_shutting_down(await second)
            merged.release()
            answered = await first
        assert answered.status_code == 200, answered.text
        assert "second" in answered.json()["message"]
    finally:
        await asyncio.gather(owner.child.stop(), other.child.stop())
    assert "Exception in ASGI application" not in other.child.logs()
