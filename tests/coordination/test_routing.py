"""Where the Redis coordinator's pub/sub messages go, with coordinators in this process on the
real PostgreSQL and Redis: answers to the process whose caller waits, run events to the
processes watching their session, and the same over sharded pub/sub (SPUBLISH/SSUBSCRIBE,
which a standalone Redis >= 7.0 serves too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.coordination.conftest import Connect, request
from tests.multiprocess.conftest import redis_client
from tests.redis_topologies import Topology
from threadline.agents import AgentRegistry, AgentSpec
from threadline.agents.builtin import BUILTIN_AGENTS
from threadline.coordination import TurnRequest, keys
from threadline.coordination.channels import Channels, Kind
from threadline.coordination.events import RedisEvents
from threadline.coordination.local import user_message
from threadline.coordination.redis import RedisCoordinator
from threadline.events import RunEvent
from threadline.store import PostgresStore


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    opened = redis_client(redis_url)
    try:
        yield opened
    finally:
        await opened.aclose()


def traffic(coordinator: RedisCoordinator) -> tuple[dict[str, int], dict[str, int]]:
    found = coordinator.metrics()
    return found["pubsub_published"], found["pubsub_received"]


async def test_a_takeover_answers_each_message_at_the_process_that_stored_it(
    store: PostgresStore, connect: Connect
) -> None:
    stored_at, new_owner, bystander = (
        await connect(store),
        await connect(store),
        await connect(store),
    )
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    # Stored at `stored_at`, whose caller waits there; its owner died before running it.
    asked = dataclasses.replace(request(session.id, "orphaned"), reply_to=stored_at.node)
    message, _ = await store.add_user_message(session.id, user_message(asked))
    waiting = stored_at._mailbox.expect(session.id, message.id)
    assert await new_owner._leases.claim(session.id)

    await new_owner.take_over(session.id)

    answer = await waiting
    stored_at._mailbox.forget(message.id)
    while traffic(new_owner)[0].get("answer") != 1:  # counted once Redis replied
        await asyncio.sleep(0.01)
    assert answer.outcome.error is None
    assert answer.outcome.result is not None
    assert answer.outcome.result.message == "echo: orphaned"
    assert traffic(new_owner)[1] == {}
    assert traffic(stored_at) == ({}, {"answer": 1})
    assert traffic(bystander) == ({}, {})


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)  # reads Redis's own view
async def test_watchers_of_one_session_share_one_subscription_while_they_watch(
    store: PostgresStore, connect: Connect, redis: Redis
) -> None:
    coordinator = await connect(store)
    sid = uuid.uuid4()
    channel = keys.events_channel(sid)

    async def listening() -> int:
        found = dict(await redis.pubsub_numsub(channel))
        return int(found[channel.encode()])

    assert await listening() == 0
    async with coordinator.events.watch(sid):
        assert await listening() == 1
        async with coordinator.events.watch(sid, after="0"):
            assert await listening() == 1
            assert channel in coordinator.metrics()["channels"]
        assert await listening() == 1
    # The last watcher gone, so is the subscription (confirmed by Redis: ask until it is).
    while await listening() != 0:
        await asyncio.sleep(0.01)
    assert channel not in coordinator.metrics()["channels"]


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)  # reads Redis's own view
async def test_sharded_pubsub_carries_nudges_answers_and_events(
    store: PostgresStore, connect: Connect, redis: Redis
) -> None:
    owner = await connect(store, sharded=True)
    caller = await connect(store, sharded=True)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    sid = session.id
    channel = keys.events_channel(sid)
    assert await owner._leases.claim(sid)
    # Held for the test: the owner's renewals must not let the idle session go before the
    # caller's message reaches it.
    async with owner._leases.pinned(sid), caller.events.watch(sid) as watch:
        assert dict(await redis.pubsub_shardnumsub(channel)) == {channel.encode(): 1}
        assert dict(await redis.pubsub_numsub(channel)) == {channel.encode(): 0}

        answer = await caller.submit(request(sid, "sharded"))

        assert answer.outcome.result is not None
        assert answer.outcome.result.message == "echo: sharded"
        kinds: list[str] = []
        while not kinds or kinds[-1] != "run.completed":
            event = await watch.next()
            assert event is not None
            kinds.append(event.kind)
    logged = await redis.xlen(keys.events_log(sid))
    assert len(kinds) == logged
    # The nudge went out of the script (cluster-safe), the answer to the caller's process.
    assert traffic(caller) == ({"nudge": 1}, {"answer": 1, "event": logged})
    # The owner counts what it published once Redis replied, which may be after the caller
    # got it: wait for the count (the test's timeout bounds it).
    while traffic(owner)[0] != {"answer": 1, "event": logged}:
        await asyncio.sleep(0.01)
    assert traffic(owner)[1] == {"nudge": 1}
    while dict(await redis.pubsub_shardnumsub(channel)) != {channel.encode(): 0}:
        await asyncio.sleep(0.01)


async def test_a_repeat_at_a_third_process_gets_its_answer_there_and_the_first_caller_at_its_own(
    store: PostgresStore, connect: Connect
) -> None:
    go = asyncio.Event()

    async def held(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await go.wait()
        return ModelResponse(parts=[TextPart("held reply")])

    spec = AgentSpec(name="held", model=FunctionModel(held, model_name="held"))

    def registry() -> AgentRegistry:
        return AgentRegistry([*BUILTIN_AGENTS, spec], default_model="threadline:echo")

    owner = await connect(store, registry=registry())
    first_at = await connect(store, registry=registry())
    repeat_at = await connect(store, registry=registry())
    session = await store.create_session("held", user_id=f"u-{uuid.uuid4()}")
    sid = session.id
    asked = TurnRequest(sid, "held", "once", "merge", idempotency_key="k-1")
    assert await owner._leases.claim(sid)
    async with owner._leases.pinned(sid):  # no idle release while the test sets things up
        first = asyncio.create_task(first_at.submit(asked))
        while owner.metrics()["runs_in_flight"] != 1:  # the first message's run is held
            await asyncio.sleep(0.01)
        repeat = asyncio.create_task(repeat_at.submit(asked))
        # The repeat's nudge names the message to follow and the repeat's own process.
        while owner.metrics()["pubsub_received"].get("nudge") != 2:
            await asyncio.sleep(0.01)
        go.set()
        answers = await asyncio.gather(first, repeat)

    assert answers[0].outcome.run_id == answers[1].outcome.run_id
    assert answers[0].message_id == answers[1].message_id
    assert answers[1].replayed
    while owner.metrics()["pubsub_published"].get("answer") != 2:  # counted once Redis replied
        await asyncio.sleep(0.01)
    # One answer to each process where a caller waited, none to the other.
    assert traffic(first_at)[1] == {"answer": 1}
    assert traffic(repeat_at)[1] == {"answer": 1}
    # The owner heard both nudges and nothing else. Nudges are hints that may come again
    # (adopting or following a message twice is a no-op): one full-suite CI run saw a
    # third (cause not pinned down: a recovery or a retried publish), so at least two.
    heard = traffic(owner)[1]
    assert set(heard) == {"nudge"}
    assert heard["nudge"] >= 2


async def test_over_a_redis_cluster_events_and_answers_reach_only_their_listener(
    redis_cluster: Topology,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        clients = [redis_cluster.client(), redis_cluster.client()]
        assert all(isinstance(c, RedisCluster) for c in clients)
        for client in clients:
            await client.initialize()
            stack.push_async_callback(client.aclose)
        here, there = (Channels(c, c, sharded=True, timeout_s=2.0) for c in clients)
        answers: dict[str, list[bytes]] = {"here": [], "there": []}

        def collect(name: str) -> Callable[[bytes], Kind]:
            def handle(data: bytes) -> Kind:
                answers[name].append(data)
                return "answer"

            return handle

        await here.open(keys.node_channel("here"), collect("here"))
        await there.open(keys.node_channel("there"), collect("there"))
        tasks = [asyncio.ensure_future(c.listen()) for c in (here, there)]
        events_here = RedisEvents(clients[0], here, timeout_s=2.0)
        events_there = RedisEvents(clients[1], there, timeout_s=2.0)
        tasks.append(asyncio.ensure_future(events_there.publish_forever()))
        try:
            sid = uuid.uuid4()
            async with events_here.watch(sid) as watch:
                run_id = uuid.uuid4()
                for kind in ("run.started", "text.delta", "run.completed"):
                    events_there.emit(RunEvent(kind, sid, run_id))  # type: ignore[arg-type]
                seen = [await watch.next() for _ in range(3)]
                await there.publish(keys.node_channel("here"), "an answer", "answer")
                while not answers["here"]:
                    await asyncio.sleep(0.01)
            assert [e.kind for e in seen if e is not None] == [
                "run.started",
                "text.delta",
                "run.completed",
            ]
            assert answers == {"here": [b"an answer"], "there": []}
            assert here.received == {"event": 3, "answer": 1}
            assert there.received == {}
            channel = keys.events_channel(sid)
            while await clients[0].pubsub_shardnumsub(channel) != [(channel.encode(), 0)]:
                await asyncio.sleep(0.01)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await here.aclose()
            await there.aclose()
