"""The webhook outbox on every backend: a run's ending writes its deliveries in the same
statement (or none), and senders lease them one at a time.

The PostgreSQL database is shared, and a claim takes any due row: every test claims with a
large limit and looks only at its own rows.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID, uuid4

import pytest

from tests.store.conftest import MakeSession, answer, starting, user
from threadline.store import (
    RUN_CANCELLED,
    Attempt,
    Delivery,
    NewDelivery,
    PostgresStore,
    Reply,
    RunError,
    SQLiteStore,
    Store,
)

MANY = 10_000
SHUTDOWN = RunError("shutting_down", "the server shut down mid-run")


Owe = Callable[..., list[NewDelivery]]


@pytest.fixture
async def owed(store: Store) -> AsyncIterator[Owe]:
    """Deliveries to write; deleted afterwards, so that no app's sender (sharing the
    PostgreSQL database) goes on trying to reach their made-up hosts."""
    written: list[UUID] = []

    def owe(*urls: str) -> list[NewDelivery]:
        rows = [NewDelivery(uuid4(), url, f'{{"n": {i}}}') for i, url in enumerate(urls)]
        written.extend(r.id for r in rows)
        return rows

    yield owe
    if isinstance(store, PostgresStore):
        await store.pool.execute("DELETE FROM deliveries WHERE id = ANY($1::uuid[])", written)
    else:
        assert isinstance(store, SQLiteStore)

        def delete(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM deliveries WHERE id = ?", [(str(i),) for i in written])

        await store._run(delete)


async def open_turn(store: Store, make_session: MakeSession) -> tuple[UUID, UUID]:
    session = await make_session()
    _, turn = await store.add_user_message(session.id, user(), start=starting())
    assert turn is not None
    return session.id, turn.run.id


async def claim_own(
    store: Store, ids: list[UUID], owner: str = "a", lease_s: float = 60
) -> list[Delivery]:
    claimed = await store.claim_deliveries(owner, MANY, lease_s)
    return [d for d in claimed if d.id in ids]


async def test_a_commit_writes_its_deliveries_with_the_reply(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/hook", "http://b.test/hook")
    base = answer()

    stored = await store.commit_run(session_id, run_id, Reply(base.message, {}, tuple(rows)))

    assert stored is not None
    for row in rows:
        found = await store.get_delivery(row.id)
        assert found is not None
        assert (found.run_id, found.session_id, found.url, found.body) == (
            run_id,
            session_id,
            row.url,
            row.body,
        )
        assert (found.status, found.attempts, found.lease_owner) == ("pending", 0, None)


async def test_a_fenced_out_commit_writes_no_delivery(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    await store.start_run(session_id, starting(upto_seq=1))  # a newer run takes the fence
    rows = owed("http://a.test/hook")

    fenced = await store.commit_run(session_id, run_id, Reply(answer().message, {}, tuple(rows)))
    assert fenced is None
    assert await store.get_delivery(rows[0].id) is None


@pytest.mark.parametrize(
    ("status", "error", "writes"),
    [
        ("failed", RunError("model_error", "the model provider failed to answer"), True),
        ("cancelled", RunError(RUN_CANCELLED, "cancelled by the client"), True),
        ("cancelled", SHUTDOWN, False),
        ("superseded", None, False),
    ],
)
async def test_an_ending_writes_deliveries_only_when_it_closes_the_messages(
    store: Store,
    make_session: MakeSession,
    owed: Owe,
    status: Any,
    error: RunError | None,
    writes: bool,
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/hook")

    run = await store.finish_run(session_id, run_id, status, error=error, deliveries=rows)

    assert run is not None
    assert (await store.get_delivery(rows[0].id) is not None) is writes


async def test_a_run_that_already_ended_writes_no_delivery(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    failed = RunError("model_error", "the model provider failed to answer")
    assert await store.finish_run(session_id, run_id, "failed", error=failed) is not None
    rows = owed("http://a.test/hook")

    assert (
        await store.finish_run(session_id, run_id, "failed", error=failed, deliveries=rows) is None
    )
    assert await store.get_delivery(rows[0].id) is None


async def test_a_delivery_is_leased_to_one_sender_at_a_time(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/1", "http://a.test/2")
    ids = [r.id for r in rows]
    await store.commit_run(session_id, run_id, Reply(answer().message, {}, tuple(rows)))

    first = await claim_own(store, ids, owner="a")
    second = await claim_own(store, ids, owner="b")

    assert {d.id for d in first} == set(ids)
    assert second == []
    assert all((d.status, d.attempts, d.lease_owner) == ("delivering", 1, "a") for d in first)
    assert all(d.lease_expires_at is not None for d in first)


async def test_an_expired_lease_is_claimed_again_and_the_old_holder_cannot_settle(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/hook")
    ids = [rows[0].id]
    await store.commit_run(session_id, run_id, Reply(answer().message, {}, tuple(rows)))
    # A negative lease is expired from the start: the sender that took it was killed.
    assert len(await claim_own(store, ids, owner="killed", lease_s=-1)) == 1

    again = await claim_own(store, ids, owner="survivor")

    assert [(d.attempts, d.lease_owner) for d in again] == [(2, "survivor")]
    assert not await store.settle_delivery(ids[0], "killed", Attempt(True, 200))
    assert await store.settle_delivery(ids[0], "survivor", Attempt(True, 204))
    done = await store.get_delivery(ids[0])
    assert done is not None
    assert (done.status, done.last_status_code, done.lease_owner) == ("delivered", 204, None)
    assert done.delivered_at is not None
    assert await claim_own(store, ids) == []


async def test_a_failed_attempt_is_due_again_after_its_back_off_until_max_age(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/hook")
    ids = [rows[0].id]
    await store.commit_run(session_id, run_id, Reply(answer().message, {}, tuple(rows)))
    await claim_own(store, ids)

    later = Attempt(False, 500, "HTTP 500", retry_in_s=3600, max_age_s=86_400)
    assert await store.settle_delivery(ids[0], "a", later)
    waiting = await store.get_delivery(ids[0])
    assert waiting is not None
    assert (waiting.status, waiting.last_status_code, waiting.last_error) == (
        "pending",
        500,
        "HTTP 500",
    )
    assert waiting.next_attempt_at - dt.datetime.now(dt.UTC) > dt.timedelta(minutes=59)
    assert await claim_own(store, ids) == []  # not due for an hour

    assert await store.redeliver(ids[0]) is not None  # due now
    assert len(await claim_own(store, ids)) == 1
    too_late = Attempt(False, None, "timed out", retry_in_s=10, max_age_s=5)
    assert await store.settle_delivery(ids[0], "a", too_late)
    gave_up = await store.get_delivery(ids[0])
    assert gave_up is not None
    assert (gave_up.status, gave_up.attempts, gave_up.last_error) == ("failed", 2, "timed out")
    assert await claim_own(store, ids) == []


async def test_redeliver_makes_a_delivered_row_due_now(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/hook")
    ids = [rows[0].id]
    await store.commit_run(session_id, run_id, Reply(answer().message, {}, tuple(rows)))
    await claim_own(store, ids)
    await store.settle_delivery(ids[0], "a", Attempt(True, 200))

    again = await store.redeliver(ids[0])

    assert again is not None
    assert (again.status, again.delivered_at) == ("pending", None)
    assert [d.attempts for d in await claim_own(store, ids)] == [2]
    assert await store.redeliver(uuid4()) is None


async def test_deliveries_are_listed_newest_first_and_by_status(
    store: Store, make_session: MakeSession, owed: Owe
) -> None:
    session_id, run_id = await open_turn(store, make_session)
    rows = owed("http://a.test/1", "http://a.test/2")
    await store.commit_run(session_id, run_id, Reply(answer().message, {}, tuple(rows)))
    await claim_own(store, [rows[0].id])
    await store.settle_delivery(rows[0].id, "a", Attempt(True, 200))

    delivered, total = await store.list_deliveries(status="delivered", limit=MANY)
    everything, total_all = await store.list_deliveries(limit=MANY)

    assert rows[0].id in {d.id for d in delivered}
    assert rows[1].id not in {d.id for d in delivered}
    assert total == len(delivered)
    assert total_all >= total
    assert {r.id for r in rows} <= {d.id for d in everything}
    stamps = [d.created_at for d in everything]
    assert stamps == sorted(stamps, reverse=True)


async def test_deliveries_are_listed_by_the_user_of_their_session(
    store: Store, make_session: MakeSession, owed: Owe, user_id: str
) -> None:
    """A user key's view: the deliveries of ``owner``'s sessions only, with or without status."""
    mine_session, mine_run = await open_turn(store, make_session)
    mine = owed("http://a.test/mine")
    await store.commit_run(mine_session, mine_run, Reply(answer().message, {}, tuple(mine)))
    other = await make_session(user_id=f"{user_id}-other")
    _, turn = await store.add_user_message(other.id, user(), start=starting())
    assert turn is not None
    theirs = owed("http://a.test/theirs")
    await store.commit_run(other.id, turn.run.id, Reply(answer().message, {}, tuple(theirs)))

    owned, total = await store.list_deliveries(owner=user_id, limit=MANY)
    pending, total_pending = await store.list_deliveries(
        status="pending", owner=user_id, limit=MANY
    )
    delivered, _ = await store.list_deliveries(status="delivered", owner=user_id, limit=MANY)

    assert [d.id for d in owned] == [mine[0].id]
    assert total == 1
    assert ([d.id for d in pending], total_pending) == ([mine[0].id], 1)
    assert delivered == []
    nobody, none_total = await store.list_deliveries(owner=f"{user_id}-nobody", limit=MANY)
    assert (nobody, none_total) == ([], 0)


async def test_runs_of_a_session_are_listed_and_messages_found_by_id(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, turn = await store.add_user_message(session.id, user("one"), start=starting())
    assert turn is not None
    await store.commit_run(session.id, turn.run.id, answer())
    _, second = await store.add_user_message(session.id, user("two"), start=starting())
    assert second is not None

    runs, total = await store.list_runs(session.id, limit=1)
    rest, _ = await store.list_runs(session.id, limit=10, offset=1)

    assert total == 2
    assert [r.id for r in runs + rest] == [turn.run.id, second.run.id]
    assert await store.get_message(first.id) == first
    assert await store.get_message(uuid4()) is None
