"""A turn's objects are freed by reference counting, never left for the garbage collector.

Under load, whatever a turn leaves in a reference cycle waits for the next collection, and
that collection then walks and frees the state of every such turn at once: with one cycle per
turn (the queue's ``Job``, whose ``settle`` callback closed over the job itself) a collection
took 15-40 ms at 450 turns/s and stalled the event loop for as long (docs/performance.md,
"Reference cycles"). These tests run turns through a real server with the collector off, then
ask it what was left in cycles: nothing of threadline's own may be.

Streams are not covered: sse-starlette's task group leaves each stream's response in a cycle
through anyio's cancellation (third-party; measured in docs/performance.md).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import httpx
import pytest

from tests.apps import AppFactory, services
from tests.models import GatedModel
from threadline.agents import AgentSpec

pytestmark = pytest.mark.timeout(60)


class CycleCensus:
    """Collector off from here; ``threadline_garbage()`` collects once and lists the types of
    threadline's objects that only a collection could free."""

    def threadline_garbage(self) -> list[str]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found = sorted(
                {
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in gc.garbage
                    if type(o).__module__.startswith("threadline")
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return found


@pytest.fixture
def census() -> Iterator[CycleCensus]:
    gc.collect()
    gc.disable()
    try:
        yield CycleCensus()
    finally:
        gc.enable()


async def run(client: httpx.AsyncClient, text: str, session: str | None = None) -> httpx.Response:
    body = {"message_content": text, "user_id": "cycles"}
    if session is not None:
        body["session_id"] = session
    return await client.post("/api/v1/agent/echo/run", json=body)


async def test_answered_turns_leave_nothing_of_threadline_in_a_cycle(
    make_server: AppFactory, census: CycleCensus
) -> None:
    async with make_server() as (client, _):
        await run(client, "warm up")  # first-use caches and lazy imports, outside the count
        census.threadline_garbage()

        replies = await asyncio.gather(*(run(client, f"turn {i}") for i in range(20)))
        assert [r.status_code for r in replies] == [200] * 20
        follow_up = await run(client, "again", replies[0].json()["session_id"])
        assert follow_up.status_code == 200
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200

        assert census.threadline_garbage() == []


async def test_a_superseded_run_and_its_merged_answer_leave_nothing_in_a_cycle(
    make_server: AppFactory, census: CycleCensus
) -> None:
    texts = ("one thought", "in two messages")
    model = GatedModel(expect=texts)
    agents = [AgentSpec(name="gated", model=model.model())]
    async with make_server(agents=agents) as (client, app):
        session = str((await services(app).store.create_session("gated", user_id="c")).id)
        census.threadline_garbage()

        first = asyncio.create_task(
            client.post(
                "/api/v1/agent/gated/run",
                json={"message_content": texts[0], "session_id": session, "user_id": "c"},
            )
        )
        await model.called.wait()
        second = await client.post(
            "/api/v1/agent/gated/run",
            json={"message_content": texts[1], "session_id": session, "user_id": "c"},
        )
        assert second.status_code == 200
        assert (await first).json()["run_id"] == second.json()["run_id"]
        assert model.cancelled == 1

        assert census.threadline_garbage() == []
