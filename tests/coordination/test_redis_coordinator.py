"""The Redis coordinator's failure paths, with coordinators in this process on the real
PostgreSQL and Redis: what happens to a lease, a waiting caller or an answer when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.coordination.conftest import Connect, request
from tests.multiprocess.conftest import start_redis
from threadline.coordination import TurnRequest, keys
from threadline.coordination.leases import BUCKETS_PER_TICK
from threadline.coordination.local import user_message
from threadline.coordination.redis import WATCH_CONCURRENCY
from threadline.errors import CoordinatorUnavailable, StoreUnavailable
from threadline.queue.job import RunOptions
from threadline.store import PostgresStore

pytestmark = pytest.mark.allow_blocking  # starts a redis-server of its own in one test


async def test_a_late_nudge_for_an_answered_message_publishes_its_real_answer(
    store: PostgresStore, connect: Connect
) -> None:
    owner, other = await connect(store), await connect(store)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    # A message stored at `other`, whose nudge is still on its way to the owner...
    early, _ = await store.add_user_message(session.id, user_message(request(session.id, "e")))
    waiting = other._mailbox.expect(session.id, early.id)
    # ...is answered meanwhile by the owner's own run, which covers every unanswered message.
    answer = await owner.submit(request(session.id, "late"))
    assert set(answer.outcome.message_ids) == {early.id, answer.message_id}

    owner._on_nudge(
        {
            "session_id": str(session.id),
            "message_id": str(early.id),
            "seq": early.seq,
            "strategy": "merge",
            "options": RunOptions("echo", reply_to=other.node).to_json(),
        }
    )

    delivered = await waiting
    assert delivered.outcome.error is None
    assert delivered.outcome.run_id == answer.outcome.run_id
    assert delivered.outcome.result == answer.outcome.result
    other._mailbox.forget(early.id)


class FlakyStore:
    """The real store, whose ``unanswered`` fails once: a takeover failing after its claim."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self.failures = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def unanswered(self, session_id: uuid.UUID) -> Any:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("PostgreSQL is unavailable: injected")
        return await self._store.unanswered(session_id)


async def test_a_takeover_that_fails_after_its_claim_lets_the_lease_go(
    store: PostgresStore, connect: Connect, redis_url: str
) -> None:
    flaky = FlakyStore(store)
    coordinator = await connect(flaky)  # type: ignore[arg-type]
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await coordinator._leases.claim(session.id)

    with pytest.raises(StoreUnavailable):
        await coordinator.take_over(session.id)

    redis = coordinator._redis
    while await redis.get(keys.lease(session.id)) is not None:
        await asyncio.sleep(0.01)  # released by a task the takeover's `finally` started
    assert not coordinator._leases.holds(session.id)


async def test_the_dirty_mark_outlives_the_longest_run(
    store: PostgresStore, connect: Connect
) -> None:
    coordinator = await connect(store, model_timeout_s=300, lease_ttl_ms=1000)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await coordinator._leases.claim(session.id)
    assert await coordinator._leases.claim(session.id)  # held already: marks it dirty
    ttl_ms = await coordinator._redis.pttl(keys.dirty(session.id))
    assert ttl_ms > 300_000
    assert await coordinator._leases.release(session.id) == "dirty"
    assert await coordinator._leases.release(session.id) == "released"


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)  # a Redis of its own
async def test_a_frozen_redis_fails_a_request_within_the_redis_timeout(
    store: PostgresStore, connect: Connect, tmp_path: Path
) -> None:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not on PATH"
    redis_server = await start_redis(binary, tmp_path)
    try:
        coordinator = await connect(store, redis_url=redis_server.url, redis_timeout_s=0.5)
        session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
        os.kill(redis_server.child.process.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(CoordinatorUnavailable):
                await coordinator.submit(request(session.id, "anyone?"))
            elapsed = time.monotonic() - began
        finally:
            os.kill(redis_server.child.process.pid, signal.SIGCONT)
        # One bound for the whole call, retries included (it was four timeouts before).
        assert elapsed < 0.5 * 1.5, elapsed
        assert await store.unanswered(session.id) == []
    finally:
        with contextlib.suppress(Exception):
            await redis_server.child.stop()


async def test_a_stale_release_reply_never_drops_a_newer_claim(
    store: PostgresStore, connect: Connect
) -> None:
    coordinator = await connect(store)
    leases = coordinator._leases
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await leases.claim(session.id)
    script = leases._release
    replied, deliver = asyncio.Event(), asyncio.Event()

    async def held_back_reply(**kwargs: Any) -> Any:
        result = await script(**kwargs)  # the release happens in Redis...
        replied.set()
        await deliver.wait()  # ...but its reply reaches us only after a new claim
        return result

    leases._release = held_back_reply  # type: ignore[method-assign]
    releasing = asyncio.create_task(leases.release(session.id))
    await replied.wait()
    assert await leases.claim(session.id)  # a new message: the lease is ours again
    deliver.set()
    assert await releasing == "released"

    # The newer claim is still held, and renewed, and the lease in Redis is its token.
    assert leases.holds(session.id)
    token = await coordinator._redis.get(keys.lease(session.id))
    assert token is not None
    assert token.decode() == leases._held[session.id]
    lost, _ = await leases.renew(lambda sid: sid == session.id)
    assert lost == []


async def test_a_takeover_runs_each_message_the_way_its_caller_asked(
    store: PostgresStore, connect: Connect
) -> None:
    coordinator = await connect(store)
    session = await store.create_session("assistant", user_id=f"u-{uuid.uuid4()}")
    # Stored by a process that died before running it: another agent than the session's
    # creator named, and a context only its caller knew.
    asked = TurnRequest(
        session.id,
        "echo",
        '/call conversation_context {"key": "order"}',
        "merge",
        user_id="caller-7",
        context={"order": "A-42"},
        history_limit=3,
    )
    message, _ = await store.add_user_message(session.id, user_message(asked))
    assert await coordinator._leases.claim(session.id)

    await coordinator.take_over(session.id)

    while (found := await store.answer_for(message.id)) is None:
        await asyncio.sleep(0.01)  # the adopted run commits in the background
    run, reply = found
    assert reply is not None
    assert "[conversation_context -> A-42]" in reply.content
    assert run.agent == "echo"


class GatedInsertStore(FlakyStore):
    """The real store, whose inserts pause once stored until the test lets them go on."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        self.failures = 0
        self.stored = asyncio.Event()
        self.go_on = asyncio.Event()

    async def add_user_message(self, *args: Any, **kwargs: Any) -> Any:
        stored = await self._store.add_user_message(*args, **kwargs)
        self.stored.set()
        await self.go_on.wait()
        return stored


async def test_a_caller_leaving_between_its_insert_and_its_nudge_leaves_no_message_behind(
    store: PostgresStore, connect: Connect
) -> None:
    owner = await connect(store)
    gated = GatedInsertStore(store)
    other = await connect(gated)  # type: ignore[arg-type]
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await owner._leases.claim(session.id)  # the message goes through `other`'s nudge

    caller = asyncio.create_task(other.submit(request(session.id, "stored, then gone")))
    await gated.stored.wait()
    caller.cancel()  # the client disconnects right after the insert
    with pytest.raises(asyncio.CancelledError):
        await caller
    gated.go_on.set()

    # The nudge still went out: the message is answered without any later message.
    (message,) = [m for m in (await store.list_messages(session.id))[0] if m.role == "user"]
    while await store.answer_for(message.id) is None:
        await asyncio.sleep(0.01)  # answered by a run in the background


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)  # reads the pool
async def test_renewals_do_not_wait_behind_an_exhausted_request_pool(
    store: PostgresStore, connect: Connect
) -> None:
    coordinator = await connect(store, redis_max_connections=2, redis_timeout_s=30)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await coordinator._leases.claim(session.id)
    # Every connection of the request pool is busy with a command that does not return.
    blockers = [
        asyncio.create_task(coordinator._redis.blpop([f"threadline:test:{uuid.uuid4()}"], 25))
        for _ in range(2)
    ]
    pool: Any = coordinator._redis.connection_pool
    while len(pool._in_use_connections) < 2:
        await asyncio.sleep(0.01)

    lost, idle = await coordinator._leases.renew(lambda sid: sid == session.id)

    assert (lost, idle) == ([], [])
    assert not any(task.done() for task in blockers)  # renewed while the pool was exhausted
    for task in blockers:
        task.cancel()
    await asyncio.gather(*blockers, return_exceptions=True)


class GatedCommitStore(FlakyStore):
    """The real store, whose commits wait until the test lets them go on."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        self.failures = 0
        self.committing = asyncio.Event()
        self.go_on = asyncio.Event()

    async def commit_run(self, *args: Any, **kwargs: Any) -> Any:
        self.committing.set()
        await self.go_on.wait()
        return await self._store.commit_run(*args, **kwargs)


async def test_a_message_adopted_twice_has_its_answer_published_once(
    store: PostgresStore, connect: Connect
) -> None:
    gated = GatedCommitStore(store)
    owner = await connect(gated)  # type: ignore[arg-type]
    other = await connect(store)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await owner._leases.claim(session.id)
    # Stored at `other`, whose caller waits there (named in the message); its nudge reaches
    # the owner...
    asked = dataclasses.replace(request(session.id, "x"), reply_to=other.node)
    message, _ = await store.add_user_message(session.id, user_message(asked))
    waiting = other._mailbox.expect(session.id, message.id)
    owner._on_nudge(
        {
            "session_id": str(session.id),
            "message_id": str(message.id),
            "seq": message.seq,
            "strategy": "merge",
            "options": RunOptions("echo", reply_to=other.node).to_json(),
        }
    )
    await gated.committing.wait()
    # ...and while its run commits, the owner takes the session over (its release found the
    # session dirty), which adopts the same unanswered message again.
    await owner.take_over(session.id)
    gated.go_on.set()

    answer = await waiting
    assert answer.outcome.error is None
    # Every publication of the answer was spawned when the run's future completed.
    answering = [t for t in owner._tasks if t.get_coro().__qualname__.endswith("_answer")]
    await asyncio.gather(*answering)
    assert owner._channels.published["answer"] == 1
    other._mailbox.forget(message.id)


class MeetingStore(FlakyStore):
    """The real store, whose first ``parties`` reads of unanswered messages wait for each
    other: they only get through if that many takeovers run at once."""

    def __init__(self, store: PostgresStore, parties: int) -> None:
        super().__init__(store)
        self.failures = 0
        self.met = asyncio.Barrier(parties)
        self.parties = parties

    async def unanswered(self, session_id: uuid.UUID) -> Any:
        if self.parties:
            self.parties -= 1
            # A guard against hanging the suite when takeovers run one after another.
            async with asyncio.timeout(10):
                await self.met.wait()
        return await self._store.unanswered(session_id)


async def test_one_watchdog_pass_takes_over_every_orphan_it_finds_several_at_once(
    store: PostgresStore, connect: Connect
) -> None:
    """A process died holding more sessions than a pass once took (20), all in the buckets
    the survivor's next pass reads: that pass adopts every one, WATCH_CONCURRENCY at a time,
    so none waits for later passes beyond the takeover bound."""
    dead = await connect(store, lease_ttl_ms=60_000)
    meeting = MeetingStore(store, WATCH_CONCURRENCY)
    survivor = await connect(meeting, lease_ttl_ms=60_000)  # no pass of its own in the test
    survivor._leases._cursor = 0
    read_next = {i % keys.N_BUCKETS for i in range(BUCKETS_PER_TICK)}
    messages: dict[uuid.UUID, uuid.UUID] = {}
    while len(messages) < 30:
        session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
        if keys.bucket(session.id) not in read_next:
            continue
        assert await dead._leases.claim(session.id)
        asked = request(session.id, f"message {len(messages)}")
        message, _ = await store.add_user_message(session.id, user_message(asked))
        messages[session.id] = message.id
    # It dies: its leases are gone and due in the index, as once their TTL ran out.
    await dead._leases.drop_all()

    await survivor._watch()

    adopted = {sid for sid in messages if survivor.queue.has(sid)}
    answered = {sid for sid, mid in messages.items() if await store.answer_for(mid)}
    assert adopted | answered == set(messages)
    for mid in messages.values():
        while await store.answer_for(mid) is None:
            await asyncio.sleep(0.01)  # the adopted runs commit in the background


async def test_the_owner_unlists_a_session_a_remote_caller_listed_so_no_cleanup_is_left(
    store: PostgresStore, connect: Connect
) -> None:
    """A caller at another process LISTs the session before its claim fails (the owner holds
    it), which moves the entry's score past the one the owner knows. Its nudge tells the
    owner that score, so the owner's release removes the entry: no entry is left for a
    watchdog to find due, claim and release (a "cleanup") once the session goes quiet."""
    owner = await connect(store, lease_ttl_ms=60_000)  # no renewal or watchdog pass in the test
    other = await connect(store, lease_ttl_ms=60_000)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    sid = session.id
    assert await owner._leases.claim(sid)
    bucket = keys.active(keys.bucket(sid))
    owners_score = await owner._redis.zscore(bucket, str(sid))

    # "Look at the store" from the other process: its LIST moves the score, its claim fails.
    assert not await other._leases.nudge(sid, {"session_id": str(sid)})
    assert await owner._redis.zscore(bucket, str(sid)) > owners_score

    # The owner takes the session over (nothing to run), finds it dirty, looks again and lets
    # it go; its release's UNLIST is the last step.
    while owner._leases.holds(sid) or sid in owner._releasing:
        await asyncio.sleep(0.01)
    assert await owner._redis.get(keys.lease(sid)) is None
    assert await owner._redis.zscore(bucket, str(sid)) is None
