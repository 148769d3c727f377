"""A stream's answer may overtake its run's events; the stream still carries all of them.

With Redis, the runner's events reach the bus through a publishing task while the answer comes
straight from the queue (or the mailbox), so the answer can arrive first. The test holds the
run's events back until the stream, its answer in, has read the log, as a slow publisher would.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest
from httpx_sse import aconnect_sse

from tests.apps import AppFactory, services
from threadline.events import RunEvent

pytestmark = pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)


async def test_a_stream_waits_for_the_events_its_answer_overtook(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_app() as (client, app):
        bus: Any = services(app).coordinator.events
        held: list[RunEvent] = []
        read_log = asyncio.Event()
        replay = bus.replay

        def hold(event: RunEvent) -> None:
            held.append(event)  # emitted by the runner, not yet published

        async def replay_then_tell(session_id: UUID, after: str) -> list[RunEvent]:
            found: list[RunEvent] = await replay(session_id, after)
            read_log.set()
            return found

        monkeypatch.setattr(bus, "emit", hold)
        monkeypatch.setattr(bus, "replay", replay_then_tell)
        text = "one two three four five six seven eight nine ten"

        async def stream() -> list[tuple[str, Any]]:
            body = {"message_content": text, "stream": True}
            async with aconnect_sse(client, "POST", "/api/v1/agent/echo/run", json=body) as src:
                assert src.response.status_code == 200
                return [(sse.event, sse.json()) async for sse in src.aiter_sse()]

        streaming = asyncio.create_task(stream())
        await read_log.wait()  # the answer is in and the stream has read the log
        assert held[-1].kind == "run.completed"
        monkeypatch.undo()
        for event in held:
            bus.emit(event)  # the publisher catches up
        events = await streaming

    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["message.accepted", "run.started"], kinds
    assert kinds[-1] == "run.completed", kinds
    deltas = [data["delta"] for kind, data in events if kind == "text.delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == events[-1][1]["message"] == f"echo: {text}"
