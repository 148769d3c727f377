"""``TurnQueue.follow``: another caller of a message the queue holds (a request repeating an
idempotency key) gets the same answer, and changes nothing about what runs or when.

Driven with the fakes of ``test_core.py``: every ordering is forced with events.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from threadline.errors import ModelError, StoreUnavailable
from threadline.queue.core import Answer, TurnQueue

from .fakes import FakeRunner, FakeStore
from .test_core import A, B, MakeQueue, make_queue, returned, runner, store, submit

__all__ = ["make_queue", "runner", "store"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(10)


def follow(queue: TurnQueue, message_id: uuid.UUID) -> asyncio.Task[asyncio.Future[Answer] | None]:
    return asyncio.create_task(queue.follow(A, message_id))


async def let_run() -> None:
    """Give every ready task its next steps (a follower reaching its wait); no time passes."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_follower_of_a_pending_message_gets_its_answer(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    caller = submit(queue, store, A)
    run = await runner.started(1)
    message = store.messages[0]

    future = await queue.follow(A, message.id)
    assert future is not None
    assert not future.done()
    run.reply()
    answer = await caller

    assert await asyncio.shield(future) == answer
    assert answer.message_id == message.id
    assert len(runner.runs) == 1


async def test_following_a_message_never_supersedes_its_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run = await runner.started(1)
    second = submit(queue, store, A, strategy="enqueue")
    await returned(store, 2)

    # Both the message being run and the one waiting for the next run are followed.
    followers = [await queue.follow(A, m.id) for m in store.messages]
    assert run.job.cancel_reason is None
    assert run.state == "running"
    assert len(runner.runs) == 1
    run.reply()
    run2 = await runner.started(2)
    run2.reply()

    answers = [await first, await second]
    assert [await asyncio.shield(f) for f in followers if f is not None] == answers
    assert [a.outcome.run_id for a in answers] == [run.job.run_id, run2.job.run_id]


async def test_a_follower_of_a_failed_message_gets_the_same_error(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    caller = submit(queue, store, A)
    run = await runner.started(1)
    future = await queue.follow(A, store.messages[0].id)
    assert future is not None
    run.fail()

    answer = await caller
    assert isinstance(answer.outcome.error, ModelError)
    assert (await asyncio.shield(future)).outcome.error is answer.outcome.error


async def test_a_follower_waits_for_the_insert_of_its_message_to_come_back(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    reply = asyncio.Event()
    caller = submit(queue, store, A, reply=reply)
    # Stored, but the store's reply is still on its way back: the queue has no waiter yet.
    await store.changed.wait_for(lambda: len(store.messages) == 1)
    message = store.messages[0]
    follower = follow(queue, message.id)
    await let_run()
    assert not follower.done()

    reply.set()
    future = await follower
    assert future is not None
    run = await runner.started(1)
    run.reply()
    assert await asyncio.shield(future) == await caller


async def test_a_follower_of_a_message_the_queue_does_not_hold_gets_none(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    assert await queue.follow(A, uuid.uuid4()) is None  # no such session here

    reply = asyncio.Event()
    caller = submit(queue, store, A, reply=reply)
    await store.changed.wait_for(lambda: len(store.messages) == 1)
    elsewhere = follow(queue, uuid.uuid4())  # stored by another process, say
    other_session = await queue.follow(B, store.messages[0].id)
    assert other_session is None
    reply.set()

    assert await elsewhere is None  # once the insert in flight came back as another message
    run = await runner.started(1)
    run.reply()
    answer = await caller
    assert await queue.follow(A, answer.message_id) is None  # answered: no longer held


async def test_a_follower_of_a_failed_insert_gets_none(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    insert = asyncio.Event()
    caller = submit(queue, store, A, insert=insert, error=StoreUnavailable("down"))
    await store.changed.wait_for(lambda: len(store.calls) == 1)
    follower = follow(queue, uuid.uuid4())
    await let_run()
    assert not follower.done()
    insert.set()

    assert await follower is None
    with pytest.raises(StoreUnavailable):
        await caller
    assert runner.runs == []
