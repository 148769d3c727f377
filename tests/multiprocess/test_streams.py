"""Streams, joiners and cancels across three real server processes sharing PostgreSQL and Redis.

The runs are the ``streamed`` agent's (``tests/mp_agents.py``): half of a reply streams before
the test's gate, the rest once the test opens it. So a test knows, without timing, that a run
is in flight and what it has streamed so far, in whichever process it runs. A session's owner
is the process its first message reached (checked against the lease in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.multiprocess.conftest import (
    SEPARATOR,
    Gate,
    GateCall,
    MakeSession,
    Server,
    history,
    post,
    running_servers,
    runs,
    server_env,
    stored,
    wait_until,
)
from tests.redis_topologies import Topology
from threadline.agents.echo import chunks
from threadline.coordination import keys
from threadline.coordination.connection import Client

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]
# The same tests against each Redis mode (tests/redis_topologies.py).
REDIS_MODES = ("standalone", "cluster", "sentinel")

AGENT = "streamed"
RUN = f"/api/v1/agent/{AGENT}/run"
# Enough words that a reply comes in eight chunks: four before the gate, four after.
WORDS = "one two three four five six seven eight nine ten eleven twelve"


@dataclass(frozen=True)
class Event:
    kind: str
    id: str
    data: dict[str, Any]


class Events:
    """An SSE response read one event at a time, as the test needs them."""

    def __init__(self, source: AsyncIterator[ServerSentEvent]) -> None:
        self._source = source
        self.seen: list[Event] = []

    async def next(self) -> Event:
        sse = await anext(self._source)
        event = Event(sse.event, sse.id, sse.json())
        self.seen.append(event)
        return event

    async def take(self, count: int) -> list[Event]:
        return [await self.next() for _ in range(count)]

    async def rest(self) -> list[Event]:
        """Every event until the server ends the stream."""
        return [Event(s.event, s.id, s.json()) async for s in self._source]


@contextlib.asynccontextmanager
async def sse(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> AsyncIterator[Events]:
    async with aconnect_sse(client, method, url, **kwargs) as source:
        assert source.response.status_code == 200, await source.response.aread()
        yield Events(source.aiter_sse())


def body(sid: uuid.UUID, text: str, **extra: Any) -> dict[str, Any]:
    return {"message_content": text, "session_id": str(sid), **extra}


def reply_pieces(prompt: str) -> tuple[list[str], list[str]]:
    """The deltas of the reply to ``prompt``: those before the gate, those after."""
    pieces = chunks(f"echo: {prompt}")
    half = len(pieces) // 2
    return pieces[:half], pieces[half:]


def deltas(events: list[Event]) -> list[str]:
    return [e.data["delta"] for e in events if e.kind == "text.delta"]


@dataclass
class Owners:
    """Which process owns a session: the lease in Redis against each server's node id."""

    redis: Client

    async def of(self, client: httpx.AsyncClient, sid: uuid.UUID, server: Server) -> bool:
        raw = await self.redis.get(keys.lease(sid))
        token = raw.decode() if isinstance(raw, bytes) else raw
        metrics = (await client.get(f"{server.url}/debug/metrics")).json()
        node: str = metrics["coordinator"]["node"]
        return token is not None and token.rpartition(":")[0] == node


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(pg_dsn: str, topology: Topology, workdir: Path) -> AsyncIterator[list[Server]]:
    env = server_env(pg_dsn, topology)
    async with running_servers(3, env, workdir, f"streams-{topology.mode}") as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def owners(topology: Topology) -> AsyncIterator[Owners]:
    redis = topology.client()
    try:
        yield Owners(redis)
    finally:
        await redis.aclose()


async def watchers(client: httpx.AsyncClient, server: Server) -> int:
    count: int = (await client.get(f"{server.url}/debug/metrics")).json()["coordinator"]["watchers"]
    return count


@pytest.mark.timeout(30)
async def test_a_stream_at_a_process_that_does_not_own_the_session_gets_the_live_reply(
    servers: list[Server],
    client: httpx.AsyncClient,
    make_session: MakeSession,
    gate: Gate,
    owners: Owners,
) -> None:
    sid = (await make_session(AGENT)).id
    owner, other = servers[0], servers[1]
    first = post(client, owner, sid, f"first\n{gate.line()}", AGENT)
    held = await gate.next()  # the first message's run is in flight at its owner
    assert await owners.of(client, sid, owner)

    text = f"{WORDS}\n{gate.line()}"
    before, after = reply_pieces(text)
    request = body(sid, text, stream=True, strategy="enqueue")
    async with sse(client, "POST", f"{other.url}{RUN}", json=request) as events:
        accepted = await events.next()
        assert accepted.kind == "message.accepted"
        held.release()  # the owner runs the queued message next
        call = await gate.next()
        assert call.prompt == text
        started, *streamed = await events.take(1 + len(before))
        assert started.kind == "run.started"
        assert started.data["message_ids"] == [accepted.data["message_id"]]
        # Half the reply has come while the model call is held at the gate: it is live.
        assert [e.kind for e in streamed] == ["text.delta"] * len(before)
        assert deltas(streamed) == before
        assert await owners.of(client, sid, owner)  # the run is the owner's, not ours
        call.release()
        rest = await events.rest()

    assert [e.kind for e in rest] == ["text.delta"] * len(after) + ["run.completed"]
    assert deltas(rest) == after
    final = rest[-1].data
    assert "".join(deltas(streamed + rest)) == final["message"] == f"echo: {text}"
    assert final["run_id"] == started.data["run_id"]
    assert final["message_ids"] == [accepted.data["message_id"]]
    assert {e.data["run_id"] for e in [started, *streamed, *rest]} == {final["run_id"]}
    ids = [e.id for e in [accepted, started, *streamed, *rest]]
    assert len(set(ids)) == len(ids), ids
    assert (await first).status_code == 200


@pytest.mark.timeout(30)
async def test_a_stream_follows_its_message_into_a_run_merged_at_another_process(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
    owners: Owners,
) -> None:
    sid = (await make_session(AGENT)).id
    owner, streaming, third = servers
    texts = [f"{word} {WORDS}\n{gate.line()}" for word in ("first", "second", "third")]
    first = post(client, owner, sid, texts[0], AGENT)
    call = await gate.next()
    assert await owners.of(client, sid, owner)

    async with sse(
        client, "POST", f"{streaming.url}{RUN}", json=body(sid, texts[1], stream=True)
    ) as events:
        accepted = await events.next()
        await call.cancelled()  # the second message superseded the first run
        call = await gate.next()
        assert call.prompt == SEPARATOR.join(texts[:2])
        before, _ = reply_pieces(call.prompt)
        started, *superseded_text = await events.take(1 + len(before))
        assert started.kind == "run.started"
        assert deltas(superseded_text) == before

        last = post(client, third, sid, texts[2], AGENT)  # merges at yet another process
        await call.cancelled()
        call = await gate.next()
        assert call.prompt == SEPARATOR.join(texts)
        before, after = reply_pieces(call.prompt)
        superseded, merged, *streamed = await events.take(2 + len(before))
        call.release()
        rest = await events.rest()

    ids = [str(r["id"]) for r in await runs(db, sid)]
    message_ids = started.data["message_ids"]
    assert accepted.data["message_id"] == message_ids[1]
    assert superseded.kind == "run.superseded"
    assert superseded.data["run_id"] == started.data["run_id"]
    assert merged.kind == "run.started"
    assert superseded.data["superseded_by"] == merged.data["run_id"]
    assert merged.data["message_ids"][:2] == message_ids
    assert len(merged.data["message_ids"]) == 3
    assert deltas(streamed) == before
    assert [e.kind for e in rest] == ["text.delta"] * len(after) + ["run.completed"]
    final = rest[-1].data
    assert final["run_id"] == merged.data["run_id"]
    assert final["message_ids"] == merged.data["message_ids"]
    assert final["superseded"] is True
    assert "".join(deltas(streamed + rest)) == final["message"] == f"echo: {call.prompt}"

    responses = await asyncio.gather(first, last)
    bodies = [r.json() for r in responses]
    assert [r.status_code for r in responses] == [200, 200], bodies
    assert {b["run_id"] for b in bodies} == {final["run_id"]}
    assert final["run_id"] in ids
    assert started.data["run_id"] in ids


@pytest.mark.timeout(30)
async def test_a_joiner_at_another_process_resumes_without_gap_or_duplicate(
    servers: list[Server],
    client: httpx.AsyncClient,
    make_session: MakeSession,
    gate: Gate,
    owners: Owners,
) -> None:
    sid = (await make_session(AGENT)).id
    owner, joining = servers[0], servers[2]
    text = f"{WORDS}\n{gate.line()}"
    before, after = reply_pieces(text)

    async with sse(client, "POST", f"{owner.url}{RUN}", json=body(sid, text, stream=True)) as own:
        call = await gate.next()
        accepted, started, *_ = await own.take(2 + len(before))
        assert await owners.of(client, sid, owner)
        run_id = started.data["run_id"]
        url = f"{joining.url}/api/v1/runs/{run_id}/events"

        async with sse(client, "GET", url) as joiner:
            # What the run streamed so far, from the log; then the joiner goes away.
            seen = await joiner.take(2)
        assert [e.kind for e in seen] == ["run.started", "text.delta"]
        headers = {"Last-Event-ID": seen[-1].id}
        async with sse(client, "GET", url, headers=headers) as joiner:
            seen += await joiner.take(len(before) - 1)  # the rest of the first half
            call.release()  # what follows reaches the joiner live
            seen += await joiner.rest()
        expected = own.seen[1:] + await own.rest()

    ids = [e.id for e in seen]
    assert len(set(ids)) == len(ids), ids
    own_ids = [e.id for e in [accepted, *expected]]
    assert len(set(own_ids)) == len(own_ids), own_ids
    # The same events as the caller's own stream, in the same order, with the same ids.
    assert ids[:-1] == [e.id for e in expected[:-1]]
    assert [(e.kind, e.data) for e in seen[:-1]] == [(e.kind, e.data) for e in expected[:-1]]
    assert deltas(seen) == before + after
    assert seen[-1].kind == expected[-1].kind == "run.completed"
    # The same body, but for ``message_id``: a run's stream follows no single message.
    assert seen[-1].data["message_id"] is None
    assert expected[-1].data["message_id"] == accepted.data["message_id"]
    assert {**seen[-1].data, "message_id": None} == {**expected[-1].data, "message_id": None}
    assert seen[-1].data["message"] == "".join(before + after) == f"echo: {text}"
    assert seen[-1].data["message_ids"] == [accepted.data["message_id"]]

    # After the end, a joiner gets the final event at once, and nothing else.
    async with sse(client, "GET", url) as late:
        ended = await late.rest()
    assert [e.kind for e in ended] == ["run.completed"]
    assert ended[0].data == seen[-1].data


@pytest.mark.timeout(30)
@pytest.mark.parametrize("caller", ["stream", "blocking", "blocking-elsewhere"])
async def test_a_cancel_at_another_process_stops_the_run_and_keeps_its_tool_calls(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
    owners: Owners,
    caller: str,
) -> None:
    sid = (await make_session(AGENT)).id
    owner, cancelling, later = servers
    text = f"/call note\n{gate.line()}"
    first: asyncio.Task[httpx.Response] | None = None
    async with contextlib.AsyncExitStack() as stack:
        events: Events | None = None
        blocking: asyncio.Task[httpx.Response] | None = None
        if caller == "stream":
            url = f"{owner.url}{RUN}"
            request = body(sid, text, stream=True)
            events = await stack.enter_async_context(sse(client, "POST", url, json=request))
        elif caller == "blocking":
            blocking = post(client, owner, sid, text, AGENT)
        else:
            # A run held at the owner keeps the session there while the message queues.
            first = post(client, owner, sid, f"first\n{gate.line()}", AGENT)
            held = await gate.next()
            blocking = post(client, later, sid, text, AGENT, strategy="enqueue")
            await wait_until(lambda: stored(db, sid, 2), [first, blocking])
            held.release()
        call = await gate.next()  # the tool has run; the model's next call is held
        assert call.prompt == text
        assert await owners.of(client, sid, owner)
        (run,) = [r for r in await runs(db, sid) if r["status"] == "running"]
        cancel = await client.post(f"{cancelling.url}/api/v1/runs/{run['id']}/cancel")
        assert cancel.status_code == 200, cancel.text
        assert cancel.json()["status"] == "cancelled"
        assert cancel.json()["error_code"] == "run_cancelled"
        await call.cancelled()  # the model call in the owner's process was stopped
        if events is not None:
            seen = await events.rest()
            kinds = [e.kind for e in seen]
            assert kinds[:4] == ["message.accepted", "run.started", "tool.call", "tool.result"]
            assert set(kinds[4:-1]) <= {"text.delta"}, kinds
            failed = seen[-1]
            assert failed.kind == "run.failed", kinds
            assert failed.data["run_id"] == str(run["id"])
            assert failed.data["error"]["code"] == "run_cancelled"
            assert failed.data["message_ids"] == [seen[0].data["message_id"]]
        else:
            assert blocking is not None
            response = await blocking
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "run_cancelled"
            assert response.json()["error"]["run_id"] == str(run["id"])
    if first is not None:
        assert (await first).status_code == 200

    again = await client.post(f"{cancelling.url}/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "run_not_active"

    after = f"after the cancel\n{gate.line()}"
    answered = post(client, later, sid, after, AGENT)
    call = await gate.next()
    assert call.prompt == after  # the cancelled message is answered, not prompted again
    call.release()
    response = await answered
    assert response.status_code == 200, response.text
    assert response.json()["message"] == f"echo: {after}"
    messages = await history(client, later, sid)
    earlier = (f"first\n{gate.line()}", f"echo: first\n{gate.line()}")
    ours = [m for m in messages if m["content"] not in earlier]
    assert [m["role"] for m in ours] == ["user", "tool", "user", "assistant"], messages
    (tool,) = [m for m in messages if m["role"] == "tool"]
    assert "note -> noted before the gate" in tool["content"]
    assert tool["run_id"] == str(run["id"])
    assert messages[-1]["content"] == f"echo: {after}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("at", ["owner", "elsewhere"])
async def test_a_dropped_stream_does_not_cancel_its_run(
    servers: list[Server],
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    make_session: MakeSession,
    gate: Gate,
    owners: Owners,
    at: str,
) -> None:
    sid = (await make_session(AGENT)).id
    owner = servers[1]
    streaming = owner if at == "owner" else servers[2]
    first: asyncio.Task[httpx.Response] | None = None
    held: GateCall | None = None
    if at == "elsewhere":
        # A run held at the owner keeps the session there while the stream's message queues.
        first = post(client, owner, sid, f"first\n{gate.line()}", AGENT)
        held = await gate.next()
    text = f"{WORDS}\n{gate.line()}"
    before, _ = reply_pieces(text)
    request = body(sid, text, stream=True, strategy="enqueue")
    async with sse(client, "POST", f"{streaming.url}{RUN}", json=request) as own:
        accepted = await own.next()
        if held is not None:
            held.release()
        call = await gate.next()
        assert call.prompt == text
        started, *_ = await own.take(1 + len(before))
        assert started.kind == "run.started"
        assert await owners.of(client, sid, owner)
    # The client is gone; once its server has closed the stream, the run may go on.
    await wait_until(lambda: _no_watchers(client, streaming))
    call.release()

    message_id = accepted.data["message_id"]
    await wait_until(lambda: _answered(client, servers[0], message_id))
    found = {str(r["id"]): r["status"] for r in await runs(db, sid)}
    assert found[started.data["run_id"]] == "succeeded", found
    messages = await history(client, servers[0], sid)
    ours = [m for m in messages if text in m["content"]]
    assert [(m["role"], m["content"]) for m in ours] == [
        ("user", text),
        ("assistant", f"echo: {text}"),
    ], messages
    assert ours[1]["run_id"] == started.data["run_id"]
    if first is not None:
        assert (await first).status_code == 200


async def _no_watchers(client: httpx.AsyncClient, server: Server) -> bool:
    return await watchers(client, server) == 0


async def _answered(client: httpx.AsyncClient, server: Server, message_id: str) -> bool:
    state = (await client.get(f"{server.url}/api/v1/messages/{message_id}")).json()
    return bool(state["status"] != "pending")
