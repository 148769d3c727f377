"""Streaming (SSE), joiners and cancel through a real HTTP server, on every store and
coordinator: the events a client reads, across supersedes and cancels.

Ordering is controlled by ``StreamGate`` (tests/models.py): a streamed run sends its first
chunk at once and the rest only when the test releases it, or when its prompt holds every
message the test expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from pydantic_ai import RunContext

from tests.api.test_api import assert_error
from tests.apps import AppFactory, services
from tests.models import StreamGate
from threadline.agents import AgentSpec, RunDeps
from threadline.events import event_key

RUN = "/api/v1/agent/{agent}/run"


@dataclass(frozen=True)
class Event:
    kind: str
    id: str
    data: dict[str, Any]


class Stream:
    """One SSE response, read event by event."""

    def __init__(self, events: AsyncIterator[Any], status: int) -> None:
        self._events = events
        self.status = status
        self.seen: list[Event] = []

    async def next(self) -> Event:
        sse = await anext(self._events)
        event = Event(sse.event, sse.id, json.loads(sse.data))
        self.seen.append(event)
        return event

    async def until(self, kind: str) -> Event:
        while (event := await self.next()).kind != kind:
            pass
        return event

    async def rest(self) -> list[Event]:
        """Every event up to the end of the stream."""
        with contextlib.suppress(StopAsyncIteration):
            while True:
                await self.next()
        return self.seen

    def kinds(self) -> list[str]:
        return [e.kind for e in self.seen]


@contextlib.asynccontextmanager
async def streaming(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> AsyncIterator[Stream]:
    async with aconnect_sse(client, method, url, **kwargs) as source:
        yield Stream(source.aiter_sse(), source.response.status_code)


def run_stream(
    client: httpx.AsyncClient, session: str, text: str, agent: str = "gate", **extra: Any
) -> contextlib.AbstractAsyncContextManager[Stream]:
    body = {"message_content": text, "session_name": session, "stream": True, **extra}
    return streaming(client, "POST", RUN.format(agent=agent), json=body)


def post(client: httpx.AsyncClient, session: str, text: str, agent: str = "gate") -> Any:
    body = {"message_content": text, "session_name": session}
    return asyncio.create_task(client.post(RUN.format(agent=agent), json=body))


async def join_mid_run(client: httpx.AsyncClient, url: str, gate: StreamGate) -> list[Event]:
    """Join a message's stream while its run waits on ``gate``: it replays the acceptance
    and the run's start; then let the run finish and read the rest."""
    async with streaming(client, "GET", url) as joiner:
        assert (await joiner.next()).kind == "message.accepted"
        assert (await joiner.next()).kind == "run.started"
        gate.release.set()
        return await joiner.rest()


def text_of(events: list[Event], run_id: str) -> str:
    return "".join(
        e.data["delta"] for e in events if e.kind == "text.delta" and e.data["run_id"] == run_id
    )


async def test_a_stream_tells_accepted_started_deltas_and_the_blocking_reply(
    make_server: AppFactory,
) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, _):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "tell me a story") as stream:
            assert stream.status == 200
            accepted = await stream.next()
            started = await stream.next()
            first = await stream.next()
            gate.release.set()
            events = await stream.rest()

    assert accepted.kind == "message.accepted"
    message_id = accepted.data["message_id"]
    assert (started.kind, started.data["message_ids"]) == ("run.started", [message_id])
    assert first.kind == "text.delta"
    final = events[-1]
    assert final.kind == "run.completed"
    run_id = started.data["run_id"]
    assert final.data["run_id"] == run_id
    assert final.data["message_ids"] == [message_id]
    assert final.data["message_id"] == message_id
    assert final.data["message"] == "echo: tell me a story"
    # The deltas are the reply, in order, in more than one piece.
    assert text_of(events, run_id) == final.data["message"]
    assert stream.kinds().count("text.delta") > 1
    # Every event has an id, in increasing order after message.accepted.
    ids = [event_key(e.id) for e in events[:-1]]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # The same body as a blocking caller gets.
    assert set(final.data) == {
        "message",
        "session_id",
        "run_id",
        "message_ids",
        "message_id",
        "success",
        "superseded",
        "tool_calls",
        "tool_outputs",
        "usage",
    }


async def test_accept_event_stream_asks_for_a_stream(make_server: AppFactory) -> None:
    async with make_server() as (client, _):
        body = {"message_content": "hi", "session_name": f"s-{uuid.uuid4()}"}
        headers = {"Accept": "text/event-stream"}
        async with streaming(
            client, "POST", RUN.format(agent="echo"), json=body, headers=headers
        ) as stream:
            events = await stream.rest()
        plain = await client.post(RUN.format(agent="echo"), json=body)
    assert events[0].kind == "message.accepted"
    assert events[-1].kind == "run.completed"
    assert events[-1].data["message"] == "echo: hi"
    assert plain.headers["content-type"] == "application/json"


async def test_a_superseded_run_is_dropped_and_the_stream_goes_on_with_the_merged_run(
    make_server: AppFactory,
) -> None:
    gate = StreamGate(expect=("first", "second"))
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, _):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "first") as stream:
            accepted = await stream.next()
            first_run = (await stream.until("run.started")).data["run_id"]
            await stream.until("text.delta")  # the first run is streaming
            blocking = post(client, session, "second")
            superseded = await stream.until("run.superseded")
            merged = await stream.until("run.started")
            events = await stream.rest()
        answer = (await blocking).json()

    first_id = accepted.data["message_id"]
    assert superseded.data == {"run_id": first_run, "superseded_by": merged.data["run_id"]}
    assert first_id in merged.data["message_ids"]
    assert len(merged.data["message_ids"]) == 2
    final = events[-1]
    assert final.kind == "run.completed"
    assert final.data["run_id"] == merged.data["run_id"] == answer["run_id"]
    assert final.data["superseded"] is True
    assert final.data["message"] == answer["message"] == "echo: first\n---\nsecond"
    assert text_of(events, merged.data["run_id"]) == final.data["message"]
    assert gate.cancelled == 1


async def test_tool_calls_and_results_stream_between_deltas(make_server: AppFactory) -> None:
    def ring(ctx: RunContext[RunDeps], times: int) -> str:
        return f"rang {times}"

    spec = AgentSpec(name="bell", model="threadline:echo", tools=(ring,))
    async with (
        make_server(agents=[spec]) as (client, _),
        run_stream(client, f"s-{uuid.uuid4()}", '/call ring {"times": 2}', agent="bell") as stream,
    ):
        events = await stream.rest()

    kinds = [e.kind for e in events]
    call, result = kinds.index("tool.call"), kinds.index("tool.result")
    assert kinds.index("run.started") < call < result < kinds.index("text.delta")
    assert events[call].data["tool_name"] == "ring"
    assert events[call].data["args"] == {"times": 2}
    assert events[result].data["content"] == "rang 2"
    assert events[result].data["tool_call_id"] == events[call].data["tool_call_id"]
    assert events[-1].data["tool_outputs"][0]["content"] == "rang 2"


async def test_errors_before_the_message_is_stored_are_statuses_not_streams(
    make_server: AppFactory,
) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, _):
        session = f"s-{uuid.uuid4()}"
        busy = post(client, session, "hold")
        await gate.called.wait()
        body = {
            "message_content": "again",
            "session_name": session,
            "stream": True,
            "strategy": "reject",
        }
        refused = await client.post(RUN.format(agent="gate"), json=body)
        assert_error(refused, 409, "session_busy")
        missing = await client.post(
            RUN.format(agent="gate"),
            json={"message_content": "x", "session_id": str(uuid.uuid4()), "stream": True},
        )
        assert_error(missing, 404, "session_not_found")
        gate.release.set()
        assert (await busy).status_code == 200


async def test_a_dropped_stream_does_not_cancel_the_run(make_server: AppFactory) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, app):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "keep going") as stream:
            accepted = await stream.next()
            run_id = (await stream.until("run.started")).data["run_id"]
            await stream.until("text.delta")
        # The client went away mid-run; the run goes on and its reply lands.
        gate.release.set()
        async with streaming(client, "GET", f"/api/v1/runs/{run_id}/events") as joined:
            events = await joined.rest()
        store = services(app).store
        run = await store.get_run(uuid.UUID(run_id))

    assert events[-1].kind == "run.completed"
    assert events[-1].data["message_ids"] == [accepted.data["message_id"]]
    assert run is not None
    assert run.status == "succeeded"
    assert gate.cancelled == 0


async def test_joining_a_run_mid_stream_and_resuming_with_last_event_id(
    make_server: AppFactory,
) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, _):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "one two three four five six") as stream:
            run_id = (await stream.until("run.started")).data["run_id"]
            await stream.until("text.delta")
            url = f"/api/v1/runs/{run_id}/events"
            # A joiner gets what the run streamed so far, then follows it.
            async with streaming(client, "GET", url) as joiner:
                started = await joiner.next()
                first = await joiner.next()
            assert (started.kind, first.kind) == ("run.started", "text.delta")
            # The run is still live: a reconnect after run.started resumes right after it.
            resume = {"Last-Event-ID": started.id}
            async with streaming(client, "GET", url, headers=resume) as again:
                assert await again.next() == first
                gate.release.set()
                resumed = await again.rest()
            original = await stream.rest()
        async with streaming(client, "GET", url) as late:
            after_end = await late.rest()

    ids = [e.id for e in resumed]
    assert started.id not in ids
    assert len(ids) == len(set(ids))
    deltas = [e for e in original if e.kind == "text.delta"]
    assert [e.id for e in resumed if e.kind == "text.delta"] == [e.id for e in deltas]
    assert resumed[-1].kind == "run.completed"
    assert text_of(resumed, run_id) == resumed[-1].data["message"]
    # After the end: the final event alone, at once.
    assert [e.kind for e in after_end] == ["run.completed"]
    assert after_end[0].data["message"] == original[-1].data["message"]


async def test_joining_a_message_follows_it_to_its_answer(make_server: AppFactory) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, _):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "follow me") as stream:
            message_id = (await stream.next()).data["message_id"]
            await stream.until("text.delta")
            url = f"/api/v1/messages/{message_id}/events"
            joined = await join_mid_run(client, url, gate)
            await stream.rest()
        async with streaming(client, "GET", url) as late:
            after_end = await late.rest()
        unknown = await client.get(f"/api/v1/messages/{uuid.uuid4()}/events")

    assert joined[-1].kind == "run.completed"
    assert joined[-1].data["message"] == "echo: follow me"
    assert joined[-1].data["message_id"] == message_id
    assert [e.kind for e in after_end] == ["message.accepted", "run.completed"]
    assert after_end[-1].data["message_id"] == message_id
    assert_error(unknown, 404, "message_not_found")


async def test_cancel_stops_the_run_answers_its_callers_and_the_next_message_runs(
    make_server: AppFactory,
) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, app):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "stop me") as stream:
            run_id = (await stream.until("run.started")).data["run_id"]
            await stream.until("text.delta")
            blocking = post(client, session, "me too")  # merges: supersedes, then waits
            merged = (await stream.until("run.started")).data["run_id"]
            cancelled = await client.post(f"/api/v1/runs/{merged}/cancel")
            events = await stream.rest()
        waiting = await blocking
        again = await client.post(f"/api/v1/runs/{merged}/cancel")
        nothing = await client.post(f"/api/v1/sessions/{session}/cancel")
        gate.release.set()
        after = await post(client, session, "after the cancel")
        history = (await client.get(f"/api/v1/sessions/{session}")).json()["messages"]
        run = await services(app).store.get_run(uuid.UUID(merged))

    assert run_id != merged
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["status"], cancelled.json()["error_code"]) == (
        "cancelled",
        "run_cancelled",
    )
    final = events[-1]
    assert final.kind == "run.failed"
    assert final.data["error"]["code"] == "run_cancelled"
    assert_error(waiting, 409, "run_cancelled")
    assert_error(again, 409, "run_not_active")
    assert_error(nothing, 409, "run_not_active")
    assert run is not None
    assert run.status == "cancelled"
    assert len(run.message_ids) == 2
    # The cancelled messages stay in history, answered by the cancel: the next run answers
    # only the message sent after it.
    assert after.status_code == 200, after.text
    assert after.json()["message"] == "echo: after the cancel"
    assert [m["content"] for m in history if m["role"] == "user"] == [
        "stop me",
        "me too",
        "after the cancel",
    ]


async def test_cancelling_a_session_stops_its_run_in_flight(make_server: AppFactory) -> None:
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, _):
        session = f"s-{uuid.uuid4()}"
        async with run_stream(client, session, "long") as stream:
            run_id = (await stream.until("run.started")).data["run_id"]
            await stream.until("text.delta")  # the model call is under way
            cancelled = await client.post(f"/api/v1/sessions/{session}/cancel")
            events = await stream.rest()
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["id"] == run_id
    assert events[-1].kind == "run.failed"
    assert events[-1].data["error"]["code"] == "run_cancelled"
    assert gate.cancelled == 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_echo_model_streams_in_chunks_with_zero_set_up(make_server: AppFactory) -> None:
    async with (
        make_server(echo_delay_ms=50) as (client, _),
        run_stream(client, f"s-{uuid.uuid4()}", "a b c d e f g h i j", agent="echo") as stream,
    ):
        events = await stream.rest()
    deltas = [e for e in events if e.kind == "text.delta"]
    assert len(deltas) > 3
    assert "".join(e.data["delta"] for e in deltas) == events[-1].data["message"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_idle_stream_gets_heartbeats(make_server: AppFactory) -> None:
    gate = StreamGate()
    spec = AgentSpec(name="gate", model=gate.model())
    async with make_server(agents=[spec], stream_heartbeat_s=0.05) as (client, _):
        body = {"message_content": "wait", "session_name": f"s-{uuid.uuid4()}", "stream": True}
        async with client.stream("POST", RUN.format(agent="gate"), json=body) as response:
            lines = response.aiter_lines()
            # The run holds after its first chunk: only keep-alive comments come meanwhile.
            while not (await anext(lines)).startswith(": ping"):
                pass
            while not (await anext(lines)).startswith(": ping"):
                pass
            gate.release.set()
            rest = [line async for line in lines]
    assert "event: run.completed" in rest


async def test_events_of_an_ended_turn_leave_memory_and_a_joiner_mid_run_still_replays(
    make_server: AppFactory, backend: str
) -> None:
    # One process keeps a session's events in memory only while a run of it is live or
    # watched: a joiner after the end reads the store (above), so nothing else needs them.
    gate = StreamGate()
    async with make_server(agents=[AgentSpec(name="gate", model=gate.model())]) as (client, app):
        store = services(app).store
        sid = (await store.create_session("gate", user_id="u")).id
        body = {"message_content": "wait for it", "session_id": str(sid)}
        blocking = asyncio.create_task(client.post(RUN.format(agent="gate"), json=body))
        await gate.called.wait()
        (message,) = await store.unanswered(sid)
        # Nobody watched the run from its start; its live log still replays it.
        joined = await join_mid_run(client, f"/api/v1/messages/{message.id}/events", gate)
        reply = await blocking
        for i in range(5):
            assert (await post(client, f"s-{uuid.uuid4()}", f"turn {i}")).status_code == 200
        async with run_stream(client, f"s-{uuid.uuid4()}", "streamed") as stream:
            streamed = await stream.rest()
        metrics = services(app).coordinator.metrics()

    assert reply.status_code == 200
    assert joined[-1].kind == "run.completed"
    assert joined[-1].data["message"] == reply.json()["message"]
    assert streamed[-1].kind == "run.completed"
    if backend.endswith("+redis"):
        assert "event_logs" not in metrics  # events live in Redis streams there
    else:
        assert metrics["event_logs"] == 0
