"""The adaptive concurrency limit (``MAX_CONCURRENT_RUNS=auto``) through a real server process.

A real model keeps a run waiting for seconds (a streamed reply), so runs finish too rarely for
their latency to grow the limit; the limit starts at 32. Here every model call is held at the
test's gate, so no run finishes at all: the sessions past the 32nd get their model call only if
the idle loop grows the limit (``queue/limit.py``). Before it did, they waited for the first
runs to finish, which here is never.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.multiprocess.conftest import (
    Gate,
    GateCall,
    MakeSession,
    Server,
    post,
    running_servers,
    server_env,
)
from threadline.coordination.local import ADAPTIVE_INITIAL_RUNS

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres]

AGENT = "gated"
SESSIONS = ADAPTIVE_INITIAL_RUNS + 16


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(pg_dsn: str, redis_dsn: str, workdir: Path) -> AsyncIterator[Server]:
    env = server_env(pg_dsn, redis_dsn, max_concurrent_runs="auto")
    del env["THREADLINE_REDIS_URL"]  # one process: the in-process coordinator
    async with running_servers(1, env, workdir, "adaptive") as started:
        yield started[0]


async def test_runs_waiting_on_their_model_do_not_keep_other_sessions_from_a_slot(
    server: Server, gate: Gate, make_session: MakeSession
) -> None:
    sessions = [await make_session(AGENT) for _ in range(SESSIONS)]
    async with httpx.AsyncClient(timeout=60) as client:
        replies = [
            post(client, server, s.id, f"{gate.line()}\nsession {i}", agent=AGENT)
            for i, s in enumerate(sessions)
        ]
        calls: list[GateCall] = [await gate.next() for _ in range(SESSIONS)]
        # Every session's model call is in flight at once, and none has finished.
        assert not any(r.done() for r in replies)
        assert len({c.prompt.splitlines()[-1] for c in calls}) == SESSIONS
        for call in calls:
            call.release()
        answered = [await r for r in replies]
    assert [r.status_code for r in answered] == [200] * SESSIONS
    texts = [r.json()["message"].splitlines()[-1] for r in answered]
    assert texts == [f"session {i}" for i in range(SESSIONS)]
