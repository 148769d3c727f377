"""The runner's edges with a real store: what a shutdown in the middle of a commit does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID

from threadline.agents import AgentRegistry
from threadline.agents.builtin import BUILTIN_AGENTS
from threadline.config import Settings
from threadline.coordination import TurnRequest
from threadline.coordination.local import build_queue, storing
from threadline.store import Message, Reply, SQLiteStore


class SlowCommitStore(SQLiteStore):
    """SQLite whose commit waits for the test once it has started."""

    entered: asyncio.Event
    release: asyncio.Event

    async def commit_run(self, session_id: UUID, run_id: UUID, reply: Reply) -> Message | None:
        self.entered.set()
        await self.release.wait()
        return await super().commit_run(session_id, run_id, reply)


async def test_a_shutdown_inside_the_commit_answers_with_the_reply_that_landed(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/runner.db"
    store: Any = await SlowCommitStore.connect(url)
    store.entered, store.release = asyncio.Event(), asyncio.Event()
    await store.migrate()
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    registry = AgentRegistry(BUILTIN_AGENTS, default_model="threadline:echo")
    queue = build_queue(store, registry, settings)
    try:
        session = await store.create_session("echo")
        request = TurnRequest(session.id, "echo", "hello", "merge")
        accept = storing(store, request, "threadline:echo")
        caller = asyncio.create_task(queue.submit(session.id, "merge", accept, request.options))
        await store.entered.wait()

        closing = asyncio.create_task(queue.aclose(grace=0))
        await asyncio.sleep(0)  # aclose runs up to its first wait: the run is cancelled
        assert any(task.cancelling() for task in queue._tasks)
        store.release.set()
        answer = await caller
        await closing

        assert answer.outcome.error is None
        assert answer.outcome.result is not None
        assert answer.outcome.result.message == "echo: hello"
        run = await store.get_run(answer.outcome.run_id)
        assert run is not None
        assert run.status == "succeeded"
    finally:
        await store.aclose()
