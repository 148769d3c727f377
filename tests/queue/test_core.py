"""``TurnQueue`` driven through its public API with a fake store, runner and clock.

Every ordering is forced with events (``tests/queue/fakes.py``) and the debounce clock is
manual; only ``aclose``'s grace period is real time, in a test whose outcome does not depend
on its length.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal
from uuid import UUID

import pytest

from threadline.errors import (
    ModelError,
    QueueFull,
    RunCancelled,
    RunFailed,
    SessionBusy,
    ShuttingDown,
    StoreUnavailable,
)
from threadline.queue.core import Answer, Strategy, TurnQueue

from .fakes import FakeRunner, FakeStore, ManualTimers, RunRecord, SteeredLimit

pytestmark = pytest.mark.timeout(10)

A = uuid.UUID(int=0xA)
B = uuid.UUID(int=0xB)
C = uuid.UUID(int=0xC)

MakeQueue = Callable[..., TurnQueue]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def runner(store: FakeStore) -> FakeRunner:
    return FakeRunner(store)


@pytest.fixture
async def make_queue(store: FakeStore, runner: FakeRunner) -> AsyncIterator[MakeQueue]:
    queues: list[TurnQueue] = []

    def make(**options: Any) -> TurnQueue:
        options.setdefault("runner", runner)
        queue = TurnQueue(**options)
        queues.append(queue)
        return queue

    yield make
    store.release_all()
    for queue in queues:
        await queue.aclose()
        assert queue.session_count == 0
        assert queue.running == 0
    assert runner.max_in_flight_per_session <= 1
    assert store.violations == []


def submit(
    queue: TurnQueue,
    store: FakeStore,
    session: UUID,
    strategy: Strategy = "merge",
    **accept: Any,
) -> asyncio.Task[Answer]:
    return asyncio.create_task(queue.submit(session, strategy, store.accept(session, **accept)))


async def returned(store: FakeStore, count: int) -> None:
    """Wait until ``count`` inserts have come back to the queue (which reacts in that step)."""
    await store.changed.wait_for(
        lambda: sum(m.returned_at is not None for m in store.messages) >= count
    )


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` holds, for states no fake can signal."""
    while not predicate():
        await asyncio.sleep(0)


async def drained(queue: TurnQueue) -> None:
    """Wait for the queue to forget every session (its callers may be gone)."""
    await until(lambda: queue.session_count == 0)


async def committing(runner: FakeRunner, record: RunRecord) -> None:
    await runner.changed.wait_for(lambda: record.job.committing)


# -- fast path and cancel-and-merge ------------------------------------------------------


async def test_first_message_on_idle_session_opens_its_run_in_the_insert(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    caller = submit(queue, store, A)
    run = await runner.started(1)

    fast_run_id = store.calls[0].run_id
    assert fast_run_id is not None
    assert run.job.run_id == fast_run_id
    assert run.job.prepared == ("prepared", fast_run_id)
    assert queue.busy_run(A) == fast_run_id
    assert queue.running == 1
    run.reply()
    answer = await caller

    message = store.messages[0]
    assert answer.message_id == message.id
    assert answer.outcome.run_id == fast_run_id
    assert answer.outcome.message_ids == (message.id,)
    assert answer.outcome.error is None
    assert not answer.superseded
    assert message.answered_by == fast_run_id
    assert queue.session_count == 0
    assert queue.busy_run(A) is None


async def test_two_rapid_messages_cancel_the_first_run_and_share_one_answer(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    second = submit(queue, store, A)
    run2 = await runner.started(2)

    assert run1.state == "cancelled"
    assert run1.job.cancel_reason == "superseded"
    assert run1.job.superseded_by == run2.job.run_id
    assert run2.job.upto_seq == 2
    assert store.calls[1].run_id is None  # the fast path is only for an idle session
    run2.reply()
    answer1, answer2 = await first, await second

    assert answer1.outcome is answer2.outcome
    assert answer1.outcome.run_id == run2.job.run_id
    assert set(answer1.outcome.message_ids) == {m.id for m in store.messages}
    assert answer1.superseded
    assert not answer2.superseded
    assert runner.max_in_flight_per_session == 1


async def test_three_rapid_messages_are_answered_by_the_last_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    callers = [submit(queue, store, A)]
    await runner.started(1)
    callers.append(submit(queue, store, A))
    run2 = await runner.started(2)
    callers.append(submit(queue, store, A))
    run3 = await runner.started(3)

    assert run2.state == "cancelled"
    assert run3.job.upto_seq == 3
    run3.reply()
    answers = [await c for c in callers]

    assert {a.outcome.run_id for a in answers} == {run3.job.run_id}
    assert [a.superseded for a in answers] == [True, True, False]
    assert all(m.answered_by == run3.job.run_id for m in store.messages)


async def test_a_burst_arriving_in_one_step_cancels_the_run_once(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    insert = asyncio.Event()
    later = [submit(queue, store, A, insert=insert) for _ in range(2)]
    await store.changed.wait_for(lambda: len(store.calls) == 3)
    insert.set()
    run2 = await runner.started(2)
    await returned(store, 3)
    run2.reply()
    answers = [await first] + [await c for c in later]

    assert run1.state == "cancelled"
    assert run2.job.upto_seq == 3
    assert len(runner.runs) == 2
    assert {a.outcome.run_id for a in answers} == {run2.job.run_id}


async def test_message_after_commit_started_waits_for_the_next_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    run1.begin_commit()
    await committing(runner, run1)
    second = submit(queue, store, A)
    await returned(store, 2)

    assert run1.job.cancel_reason is None
    assert queue.busy_run(A) == run1.job.run_id
    run1.reply()
    answer1 = await first
    run2 = await runner.started(2)
    run2.reply()
    answer2 = await second

    assert run1.state == "succeeded"
    assert answer1.outcome.run_id == run1.job.run_id
    assert not answer1.superseded
    assert answer1.outcome.message_ids == (store.messages[0].id,)
    assert run2.job.upto_seq == 2
    assert answer2.outcome.run_id == run2.job.run_id
    assert answer2.outcome.message_ids == (store.messages[1].id,)


@pytest.mark.parametrize("first_to_wake", ["model", "message"])
async def test_cancel_racing_commit_either_commits_or_never_starts_committing(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue, first_to_wake: str
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    insert = asyncio.Event()
    second = submit(queue, store, A, insert=insert)
    await store.changed.wait_for(lambda: len(store.calls) == 2)
    # Both wake in the same loop iteration, in this order.
    if first_to_wake == "model":
        run1.begin_commit()
        insert.set()
    else:
        insert.set()
        run1.begin_commit()
    await returned(store, 2)
    await runner.changed.wait_for(lambda: run1.job.committing or run1.ended)

    if first_to_wake == "model":
        assert run1.job.committing
        assert run1.job.cancel_reason is None
        run1.reply()
        assert (await first).outcome.run_id == run1.job.run_id
        run2 = await runner.started(2)
        assert run2.job.upto_seq == 2
        run2.reply()
        assert (await second).outcome.run_id == run2.job.run_id
    else:
        assert run1.state == "cancelled"
        assert not run1.job.committing
        run2 = await runner.started(2)
        run2.reply()
        answer1, answer2 = await first, await second
        assert answer1.outcome.run_id == answer2.outcome.run_id == run2.job.run_id
        assert answer1.superseded
    assert all(m.answered_by is not None for m in store.messages)


async def test_message_stored_while_fast_path_insert_returns_cancels_the_prepared_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    slow_reply = asyncio.Event()
    first = submit(queue, store, A, reply=slow_reply)
    await store.changed.wait_for(lambda: len(store.messages) == 1)
    second = submit(queue, store, A)
    await returned(store, 1)  # the second insert is back; the first is still on its way

    assert runner.runs == []
    assert store.calls[0].run_id is not None
    assert store.calls[1].run_id is None
    assert queue.session_count == 1
    slow_reply.set()
    run2 = await runner.started(2)
    run1 = runner.runs[0]
    run2.reply()
    answer1, answer2 = await first, await second

    assert run1.job.run_id == store.calls[0].run_id
    assert run1.state == "cancelled"
    assert not run1.model_called
    assert run2.job.upto_seq == 2
    assert answer1.outcome is answer2.outcome
    assert answer1.outcome.run_id == run2.job.run_id
    assert answer1.superseded
    assert not answer2.superseded


async def test_enqueue_message_during_fast_path_insert_gets_its_own_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    slow_reply = asyncio.Event()
    first = submit(queue, store, A, "enqueue", reply=slow_reply)
    await store.changed.wait_for(lambda: len(store.messages) == 1)
    second = submit(queue, store, A, "enqueue")
    await returned(store, 1)
    slow_reply.set()
    run1 = await runner.started(1)
    run1.reply()
    answer1 = await first
    run2 = await runner.started(2)
    run2.reply()
    answer2 = await second

    assert answer1.outcome.run_id == store.calls[0].run_id == run1.job.run_id
    assert answer1.outcome.message_ids == (store.messages[0].id,)
    assert answer2.outcome.run_id == run2.job.run_id
    assert answer2.outcome.message_ids == (store.messages[1].id,)


async def test_message_stored_before_the_fast_path_insert_joins_the_prepared_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    slow_insert = asyncio.Event()
    first = submit(queue, store, A, insert=slow_insert)
    await store.changed.wait_for(lambda: len(store.calls) == 1)
    second = submit(queue, store, A)
    await returned(store, 1)
    slow_insert.set()
    run = await runner.started(1)

    assert run.job.run_id == store.calls[0].run_id
    assert run.job.upto_seq == 2  # the overtaking message got seq 1
    run.reply()
    answer1, answer2 = await first, await second
    assert answer1.outcome is answer2.outcome
    assert len(answer1.outcome.message_ids) == 2
    assert len(runner.runs) == 1


@pytest.mark.parametrize("overtaker", ["returns", "fails"])
async def test_fast_path_run_waits_for_an_insert_that_overtook_it(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue, overtaker: str
) -> None:
    # The second insert is still in flight when the fast one comes back: it got seq 1 and
    # returns later, or it fails.
    queue = make_queue()
    slow_insert, slow_reply = asyncio.Event(), asyncio.Event()
    first = submit(queue, store, A, insert=slow_insert)
    await store.changed.wait_for(lambda: len(store.calls) == 1)
    if overtaker == "returns":
        second = submit(queue, store, A, reply=slow_reply)
        await store.changed.wait_for(lambda: len(store.messages) == 1)
    else:
        error = StoreUnavailable("db down")
        second = submit(queue, store, A, insert=slow_reply, error=error)
        await store.changed.wait_for(lambda: len(store.calls) == 2)
    slow_insert.set()
    await returned(store, 1)

    assert queue.busy_run(A) is None  # the prepared run may cover seq 1: not yet
    slow_reply.set()
    run = await runner.started(1)
    run.reply()
    answer1 = await first

    assert run.job.run_id == store.calls[0].run_id
    assert answer1.outcome.run_id == run.job.run_id
    assert answer1.outcome.error is None
    if overtaker == "returns":
        assert run.job.upto_seq == 2
        answer2 = await second
        assert answer2.outcome is answer1.outcome
        assert all(m.answered_by == run.job.run_id for m in store.messages)
    else:
        with pytest.raises(StoreUnavailable):
            await second
    assert len(runner.runs) == 1


@pytest.mark.parametrize("model", ["slow", "instant"])
async def test_insert_returning_late_is_answered_by_the_run_that_answered_it(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue, model: str
) -> None:
    # Two round-trips overtake each other: seq 2 is stored before seq 3 but comes back after.
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    runner.auto = model == "instant"
    slow_reply = asyncio.Event()
    second = submit(queue, store, A, reply=slow_reply)
    await store.changed.wait_for(lambda: len(store.messages) == 2)
    third = submit(queue, store, A)
    await returned(store, 2)
    await runner.ended(run1)
    # Whatever the queue starts before the late insert is back gets to run (and, with an
    # instant model, to finish) first.
    await until(lambda: queue.running == 0 or len(runner.runs) > 1)
    await until(lambda: queue.running == 0 or runner.runs[-1].model_called)
    slow_reply.set()
    if model == "slow":
        (await runner.started(2)).reply()
    answers = [await first, await second, await third]

    assert run1.state == "cancelled"
    assert [a.outcome.error for a in answers] == [None, None, None]
    assert len({a.outcome.run_id for a in answers}) == 1
    assert all(m.answered_by == answers[0].outcome.run_id for m in store.messages)
    assert len(runner.runs) == 2


# -- enqueue and reject ------------------------------------------------------------------


async def test_enqueue_runs_fifty_messages_one_run_each_in_order(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    callers = [submit(queue, store, A, "enqueue") for _ in range(50)]
    for index in range(50):
        run = await runner.started(index + 1)
        assert run.job.upto_seq == index + 1
        assert runner.live(A) is run
        run.reply()
    answers = [await c for c in callers]

    assert [a.message_id for a in answers] == [m.id for m in store.messages]
    assert [m.seq for m in store.messages] == list(range(1, 51))
    for answer, run in zip(answers, runner.runs, strict=True):
        assert answer.outcome.run_id == run.job.run_id
        assert answer.outcome.message_ids == (answer.message_id,)
        assert not answer.superseded
    assert all(r.state == "succeeded" for r in runner.runs)
    assert runner.max_in_flight_per_session == 1


async def test_enqueue_message_does_not_cancel_the_run_in_flight(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    second = submit(queue, store, A, "enqueue")
    await returned(store, 2)

    assert run1.job.cancel_reason is None
    run1.reply()
    assert (await first).outcome.run_id == run1.job.run_id
    run2 = await runner.started(2)
    run2.reply()
    assert (await second).outcome.run_id == run2.job.run_id


async def test_a_clients_cancel_answers_the_run_and_leaves_later_messages_to_the_next(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    later = submit(queue, store, A, "enqueue")
    await returned(store, 2)

    assert queue.cancel(A, uuid.uuid4()) is None  # not the run in flight: nothing happens
    assert run1.state == "running"
    assert queue.cancel(A, run1.job.run_id) == run1.job.run_id
    assert queue.cancel(A) is None  # cancelled once only

    answer = await first
    assert run1.state == "cancelled"
    assert isinstance(answer.outcome.error, RunCancelled)
    assert answer.outcome.message_ids == (store.messages[0].id,)
    run2 = await runner.started(2)
    assert run2.job.upto_seq == 2
    run2.reply()
    assert (await later).outcome.run_id == run2.job.run_id


async def test_a_run_in_its_commit_or_not_open_yet_cannot_be_cancelled(
    store: FakeStore, make_queue: MakeQueue
) -> None:
    runner = FakeRunner(store, hold_open=True)
    queue = make_queue(runner=runner)
    caller = submit(queue, store, A)
    run = await runner.started(1)

    assert queue.cancel(A) is None  # started, but its run is not open in the store yet
    run.may_open.set()
    run.begin_commit()
    await runner.changed.wait_for(lambda: run.state == "committing")
    assert queue.cancel(A) is None
    run.reply()
    assert (await caller).outcome.error is None


async def test_reject_on_busy_session_raises_before_storing(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A, "reject")
    run = await runner.started(1)

    with pytest.raises(SessionBusy) as busy:
        await queue.submit(A, "reject", store.accept(A))
    assert busy.value.run_id == run.job.run_id
    assert busy.value.session_id == A
    assert len(store.calls) == 1
    assert run.job.cancel_reason is None
    run.reply()
    assert (await first).outcome.run_id == run.job.run_id

    later = submit(queue, store, A, "reject")  # idle again
    run2 = await runner.started(2)
    run2.reply()
    assert (await later).outcome.error is None


async def test_reject_while_an_insert_is_in_flight_is_busy_without_a_run_id(
    store: FakeStore, make_queue: MakeQueue, runner: FakeRunner
) -> None:
    queue = make_queue()
    insert = asyncio.Event()
    first = submit(queue, store, A, insert=insert)
    await store.changed.wait_for(lambda: len(store.calls) == 1)

    with pytest.raises(SessionBusy) as busy:
        await queue.submit(A, "reject", store.accept(A))
    assert busy.value.run_id is None
    assert len(store.calls) == 1
    insert.set()
    (await runner.started(1)).reply()
    await first


# -- debounce and liveness ---------------------------------------------------------------


async def test_debounce_window_restarts_on_each_message_and_merges_without_a_run(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    queue = make_queue(merge_window=1.0, merge_max_wait=10.0, timers=timers)
    callers = [submit(queue, store, A)]
    await returned(store, 1)
    assert store.calls[0].run_id is None  # no fast path inside a window
    for arrival in (2, 3):
        timers.advance(0.75)
        callers.append(submit(queue, store, A))
        await returned(store, arrival)
    timers.advance(0.75)  # 2.25: 0.75 after the last message

    assert runner.runs == []
    assert queue.running == 0
    timers.advance(0.25)  # 2.5: a quiet second after the last message
    run = await runner.started(1)
    assert run.job.upto_seq == 3
    run.reply()
    answers = [await c for c in callers]

    assert len(runner.runs) == 1
    assert {a.outcome.run_id for a in answers} == {run.job.run_id}
    assert not any(a.superseded for a in answers)  # no run was ever cancelled
    assert timers.armed == 0


async def test_debounce_window_is_capped_by_merge_max_wait_from_the_oldest_message(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    queue = make_queue(merge_window=1.0, merge_max_wait=2.0, timers=timers)
    callers = [submit(queue, store, A)]
    await returned(store, 1)
    for arrival in (2, 3):
        timers.advance(0.75)
        callers.append(submit(queue, store, A))
        await returned(store, arrival)
    timers.advance(0.25)  # 1.75: the window would end at 2.5, the cap is at 2.0

    assert runner.runs == []
    timers.advance(0.25)
    run = await runner.started(1)
    assert run.job.upto_seq == 3
    run.reply()
    assert {(await c).outcome.run_id for c in callers} == {run.job.run_id}


async def test_after_a_cancel_the_next_run_waits_for_the_window_again(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    queue = make_queue(merge_window=1.0, merge_max_wait=10.0, timers=timers)
    first = submit(queue, store, A)
    await returned(store, 1)
    timers.advance(1.0)
    run1 = await runner.started(1)
    second = submit(queue, store, A)
    await runner.ended(run1)

    assert run1.state == "cancelled"
    assert len(runner.runs) == 1
    timers.advance(0.5)
    assert len(runner.runs) == 1
    timers.advance(0.5)
    run2 = await runner.started(2)
    assert run2.job.run_id == run1.job.superseded_by
    run2.reply()
    answer1, answer2 = await first, await second
    assert answer1.outcome is answer2.outcome
    assert answer1.superseded


async def test_liveness_run_is_not_cancelled_once_oldest_message_waited_max_wait(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    queue = make_queue(merge_max_wait=2.0, timers=timers)
    callers = [submit(queue, store, A)]
    run1 = await runner.started(1)
    timers.advance(1.0)
    callers.append(submit(queue, store, A))
    run2 = await runner.started(2)  # within merge_max_wait: the first run was cancelled
    assert run1.state == "cancelled"
    timers.advance(1.0)  # the oldest covered message has now waited 2.0
    callers.append(submit(queue, store, A))
    await returned(store, 3)

    assert run2.job.cancel_reason is None
    assert runner.live(A) is run2
    run2.reply()
    answer1, answer2 = await callers[0], await callers[1]
    run3 = await runner.started(3)
    run3.reply()
    answer3 = await callers[2]

    assert answer1.outcome is answer2.outcome
    assert answer1.outcome.run_id == run2.job.run_id
    assert answer3.outcome.run_id == run3.job.run_id
    assert answer3.outcome.message_ids == (store.messages[2].id,)


async def test_ten_thousand_sessions_leave_no_state_behind(store: FakeStore) -> None:
    runner = FakeRunner(store, auto=True)
    queue = TurnQueue(runner, max_concurrent=64)
    sessions = [uuid.UUID(int=n) for n in range(10_000)]
    callers = [submit(queue, store, s) for s in sessions]
    answers = await asyncio.gather(*callers)

    assert all(a.outcome.error is None for a in answers)
    assert len(runner.runs) == 10_000
    assert runner.max_total_in_flight <= 64
    assert runner.max_in_flight_per_session == 1
    assert queue.session_count == 0
    assert queue.running == 0
    await queue.aclose()


# -- backpressure and concurrency --------------------------------------------------------


async def test_queue_full_beyond_session_queue_max_without_storing(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue(session_queue_max=3)
    callers = [submit(queue, store, A, "enqueue")]
    run1 = await runner.started(1)
    insert = asyncio.Event()
    # Inserts still in flight count: they are unanswered messages in the making.
    callers += [submit(queue, store, A, "enqueue", insert=insert) for _ in range(2)]
    await store.changed.wait_for(lambda: len(store.calls) == 3)

    with pytest.raises(QueueFull) as full:
        await queue.submit(A, "enqueue", store.accept(A))
    assert full.value.session_id == A
    assert len(store.calls) == 3
    insert.set()
    await returned(store, 3)
    with pytest.raises(QueueFull):
        await queue.submit(A, "merge", store.accept(A))
    assert len(store.calls) == 3
    # Other sessions are not affected.
    other = submit(queue, store, B)
    (await runner.started(2)).reply()
    await other

    run1.reply()
    (await runner.started(3)).reply()
    (await runner.started(4)).reply()
    answers = [await c for c in callers]
    assert len({a.outcome.run_id for a in answers}) == 3


async def test_sessions_run_in_parallel_up_to_max_concurrent_and_excess_waits(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue(max_concurrent=2)
    a = submit(queue, store, A)
    b = submit(queue, store, B)
    run_a, run_b = await runner.started(1), await runner.started(2)
    c = submit(queue, store, C)
    await returned(store, 3)
    d = submit(queue, store, A, "enqueue")  # waits for A's run, not for a slot
    await returned(store, 4)

    assert runner.total_in_flight == 2
    assert queue.running == 2
    assert store.calls[2].run_id is None  # no slot, no fast path
    run_b.reply()
    run_c = await runner.started(3)
    assert run_c.job.session_id == C
    run_a.reply()
    run_a2 = await runner.started(4)
    assert run_a2.job.session_id == A
    assert runner.max_total_in_flight == 2
    run_c.reply()
    run_a2.reply()
    for caller in (a, b, c, d):
        assert (await caller).outcome.error is None


async def test_fifo_slot_order_holds_with_one_slot(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue(max_concurrent=1)
    sessions = [uuid.uuid4() for _ in range(5)]
    callers = []
    for count, session in enumerate(sessions, start=1):
        callers.append(submit(queue, store, session))
        await returned(store, count)
    for count, session in enumerate(sessions, start=1):
        run = await runner.started(count)
        assert run.job.session_id == session
        assert queue.running == 1
        run.reply()
    for caller in callers:
        assert (await caller).outcome.error is None


async def test_depth_and_slot_waits_are_reported_as_sessions_wait_for_a_slot(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    waits: list[float] = []
    queue = make_queue(max_concurrent=1, timers=timers, on_slot_wait=waits.append)
    first = submit(queue, store, A)
    run = await runner.started(1)
    second = submit(queue, store, B)
    await returned(store, 2)
    assert (queue.depth, queue.waiting_for_slot) == (2, 1)
    assert waits == []  # A found a slot free: no wait to report
    timers.advance(2.5)
    run.reply()
    (await runner.started(2)).reply()
    await first, await second
    assert waits == [2.5]
    assert (queue.depth, queue.waiting_for_slot) == (0, 0)


# -- a limit that moves ------------------------------------------------------------------


async def test_a_limit_that_grows_starts_waiting_sessions_at_once(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    limit = SteeredLimit(1)
    queue = make_queue(max_concurrent=limit)
    callers = [submit(queue, store, session) for session in (A, B, C)]
    first = await runner.started(1)
    await returned(store, 3)
    assert (queue.running, queue.waiting_for_slot) == (1, 2)

    limit.next = 3
    queue.observe_lag(0.001)
    second, third = await runner.started(2), await runner.started(3)

    assert queue.limit == 3
    assert (queue.running, queue.waiting_for_slot) == (3, 0)
    assert [second.job.session_id, third.job.session_id] == [B, C]  # FIFO still
    for run in (first, second, third):
        run.reply()
    for caller in callers:
        assert (await caller).outcome.error is None


async def test_a_limit_that_shrinks_lets_runs_finish_and_starts_none_until_below_it(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    limit = SteeredLimit(3)
    queue = make_queue(max_concurrent=limit)
    callers = [submit(queue, store, session) for session in (A, B, C)]
    runs = [await runner.started(n) for n in (1, 2, 3)]
    limit.next = 1
    queue.observe_lag(0.5)
    assert [r.state for r in runs] == ["running"] * 3  # nothing in flight is cut short
    late = submit(queue, store, uuid.uuid4())
    await returned(store, 4)
    assert store.calls[3].run_id is None  # over the limit: no fast path either

    for run, still_running in ((runs[0], 2), (runs[1], 1)):
        run.reply()
        await until(lambda: queue.running == still_running)  # noqa: B023 (awaited here)
        assert queue.waiting_for_slot == 1
        assert len(runner.runs) == 3
    runs[2].reply()
    (await runner.started(4)).reply()

    assert runner.max_total_in_flight == 3
    for caller in [*callers, late]:
        assert (await caller).outcome.error is None


async def test_each_run_that_answers_reports_how_long_it_held_its_slot(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    limit = SteeredLimit(4)
    queue = make_queue(max_concurrent=limit, timers=timers)
    first = submit(queue, store, A)
    superseded = await runner.started(1)
    other = submit(queue, store, B)
    failing = await runner.started(2)
    timers.advance(1.0)
    second = submit(queue, store, A)  # a merge: cancels the first run of A
    answering = await runner.started(3)
    timers.advance(2.5)
    failing.fail()
    await runner.ended(failing)
    answering.reply()
    answers = [await first, await second, await other]

    assert superseded.state == "cancelled"
    assert answers[2].outcome.error is not None
    # Only the run that answered counts, from when it took its slot; B's had ended by then,
    # so it was the only run in flight.
    assert [s for s in limit.samples if s[0] == "latency"] == [("latency", 2.5, 1)]


async def test_lag_samples_reach_the_limit_with_the_runs_in_flight(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    limit = SteeredLimit(4)
    queue = make_queue(max_concurrent=limit)
    caller = submit(queue, store, A)
    run = await runner.started(1)
    queue.observe_lag(0.03)
    run.reply()
    await caller
    queue.observe_lag(0.002)
    assert limit.samples[0] == ("lag", 0.03, 1)
    assert limit.samples[-1] == ("lag", 0.002, 0)


# -- failures and disconnects ------------------------------------------------------------


async def test_model_error_answers_every_covered_caller_and_later_runs_proceed(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    await runner.started(1)
    second = submit(queue, store, A)
    run2 = await runner.started(2)
    run2.fail("error")
    answer1, answer2 = await first, await second

    for answer in (answer1, answer2):
        assert isinstance(answer.outcome.error, ModelError)
        assert answer.outcome.run_id == run2.job.run_id
    assert all(m.answered_by is None for m in store.messages)
    third = submit(queue, store, A)
    run3 = await runner.started(3)
    run3.reply()
    answer3 = await third
    assert answer3.outcome.error is None
    assert run3.job.upto_seq == 3  # a failed run leaves its messages unanswered


@pytest.mark.parametrize("how", ["error", "raise"])
async def test_message_arriving_as_the_run_fails_does_not_mark_it_superseded(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue, how: Literal["error", "raise"]
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    insert = asyncio.Event()
    second = submit(queue, store, A, insert=insert)
    await store.changed.wait_for(lambda: len(store.calls) == 2)
    # The runner returns first; the message lands before the queue has seen the run end.
    run1.fail(how)
    insert.set()
    answer1 = await first
    run2 = await runner.started(2)
    run2.reply()
    answer2 = await second

    assert answer1.outcome.run_id == run1.job.run_id
    assert isinstance(answer1.outcome.error, RunFailed)
    assert not answer1.superseded
    assert run1.job.superseded_by is None
    assert answer2.outcome.run_id == run2.job.run_id
    assert answer2.outcome.error is None


async def test_runner_exception_becomes_run_failed_for_every_covered_caller(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    second = submit(queue, store, A, "enqueue")
    await returned(store, 2)
    run1.fail("raise")
    answer1 = await first

    assert isinstance(answer1.outcome.error, RunFailed)
    assert answer1.outcome.error.run_id == run1.job.run_id
    # The caller learns nothing of the bug; the log has it with the run and session ids.
    assert str(answer1.outcome.error) == "the run failed unexpectedly"
    assert "runner bug" in caplog.text
    assert str(run1.job.run_id) in caplog.text
    run2 = await runner.started(2)
    run2.reply()
    assert (await second).outcome.error is None


async def test_failed_insert_raises_to_its_caller_and_leaves_no_state(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    with pytest.raises(StoreUnavailable):
        await queue.submit(A, "merge", store.accept(A, error=StoreUnavailable("db down")))
    assert queue.session_count == 0
    assert queue.running == 0
    assert runner.runs == []


async def test_failed_fast_path_insert_still_runs_the_message_stored_meanwhile(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    insert = asyncio.Event()
    first = submit(queue, store, A, insert=insert, error=StoreUnavailable("db down"))
    await store.changed.wait_for(lambda: len(store.calls) == 1)
    second = submit(queue, store, A)
    await returned(store, 1)
    insert.set()
    with pytest.raises(StoreUnavailable):
        await first
    run = await runner.started(1)
    run.reply()

    answer = await second
    assert answer.outcome.run_id == run.job.run_id
    assert answer.outcome.error is None


async def test_disconnected_caller_cancels_nothing_and_its_message_is_answered(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    gone = submit(queue, store, A)
    run = await runner.started(1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone

    assert run.job.cancel_reason is None
    assert queue.busy_run(A) == run.job.run_id
    run.reply()
    await runner.ended(run)
    assert store.messages[0].answered_by == run.job.run_id
    await drained(queue)


async def test_caller_disconnecting_during_its_insert_still_gets_stored_and_answered(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    insert = asyncio.Event()
    gone = submit(queue, store, A, insert=insert)
    await store.changed.wait_for(lambda: len(store.calls) == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    insert.set()
    run1 = await runner.started(1)
    stays = submit(queue, store, A)
    run2 = await runner.started(2)
    run2.reply()
    answer = await stays

    assert run1.job.run_id == store.calls[0].run_id
    assert run1.state == "cancelled"
    assert len(store.messages) == 2
    assert all(m.answered_by == run2.job.run_id for m in store.messages)
    assert answer.outcome.run_id == run2.job.run_id
    await drained(queue)


# -- shutdown ----------------------------------------------------------------------------


async def test_aclose_without_grace_cancels_runs_and_fails_every_waiter(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    timers = ManualTimers()
    queue = make_queue(max_concurrent=1, merge_window=1.0, timers=timers)
    running = submit(queue, store, A)
    await returned(store, 1)
    timers.advance(1.0)
    run = await runner.started(1)
    behind = submit(queue, store, A, "enqueue")  # waits for A's next run
    queued = submit(queue, store, B)  # waits for a slot
    await returned(store, 3)
    timers.advance(1.0)
    debouncing = submit(queue, store, C)  # inside its window
    await returned(store, 4)
    slow = asyncio.Event()
    in_flight = submit(queue, store, C, insert=slow)  # insert still in flight
    await store.changed.wait_for(lambda: len(store.calls) == 5)

    closing = asyncio.create_task(queue.aclose())
    await runner.ended(run)
    with pytest.raises(ShuttingDown):
        await queue.submit(B, "merge", store.accept(B))
    assert len(store.calls) == 5
    slow.set()
    await closing

    assert run.state == "cancelled"
    assert run.job.cancel_reason == "shutdown"
    for caller in (running, behind, queued, debouncing, in_flight):
        with pytest.raises(ShuttingDown):
            await caller
    assert len(runner.runs) == 1
    assert queue.session_count == 0
    assert queue.running == 0


async def test_aclose_lets_a_run_finish_within_grace(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    first = submit(queue, store, A)
    run = await runner.started(1)
    behind = submit(queue, store, A, "enqueue")
    await returned(store, 2)
    closing = asyncio.create_task(queue.aclose(grace=30.0))
    await asyncio.sleep(0)  # let aclose stop intake before the run ends
    with pytest.raises(ShuttingDown):
        await queue.submit(A, "merge", store.accept(A))
    run.reply()
    await closing

    assert (await first).outcome.run_id == run.job.run_id
    with pytest.raises(ShuttingDown):
        await behind  # no new run starts once closing
    assert len(runner.runs) == 1


async def test_aclose_cancels_a_run_still_going_after_grace(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    caller = submit(queue, store, A)
    run = await runner.started(1)
    # The run never finishes on its own, so the outcome does not depend on the grace length.
    await queue.aclose(grace=0.01)

    assert run.state == "cancelled"
    with pytest.raises(ShuttingDown):
        await caller


async def test_aclose_during_fast_path_insert_never_calls_the_model(
    store: FakeStore, runner: FakeRunner, make_queue: MakeQueue
) -> None:
    queue = make_queue()
    insert = asyncio.Event()
    caller = submit(queue, store, A, insert=insert)
    await store.changed.wait_for(lambda: len(store.calls) == 1)
    closing = asyncio.create_task(queue.aclose())
    await asyncio.sleep(0)
    insert.set()
    await closing

    with pytest.raises(ShuttingDown):
        await caller
    assert [(r.job.cancel_reason, r.model_called) for r in runner.runs] == [("shutdown", False)]
    assert queue.session_count == 0


async def test_a_run_superseded_before_it_opened_hands_its_id_to_the_next(
    store: FakeStore, make_queue: MakeQueue
) -> None:
    # Run 2 is cancelled while it is still loading, before the store has a row for it. The
    # next run takes over its id, so run 1's ``superseded_by`` names a run that exists.
    runner = FakeRunner(store, hold_open=True)
    queue = make_queue(runner=runner)
    first = submit(queue, store, A)
    run1 = await runner.started(1)
    run1.may_open.set()
    second = submit(queue, store, A)
    run2 = await runner.started(2)
    third = submit(queue, store, A)
    run3 = await runner.started(3)
    run3.may_open.set()
    run3.reply()
    answers = [await first, await second, await third]

    assert run2.state == "cancelled"
    assert not run2.job.opening
    assert run1.job.superseded_by == run2.job.run_id == run3.job.run_id
    assert {a.outcome.run_id for a in answers} == {run3.job.run_id}
