"""Idempotency keys in the store, on every backend: a key names one message of its session,
and a second insert with it writes nothing (no row, no seq, no run) and names the first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import asyncpg
import pytest

from tests.store.conftest import MakeSession, starting
from threadline.store import DuplicateMessage, NewMessage, PostgresStore, RunStart, Store

pytestmark = pytest.mark.timeout(20)

# How each test stores its message: the plain insert, or the fast path that opens a run too.
PATHS = ["plain", "fast"]


def keyed(key: str, content: str = "hello", fingerprint: str = "fp-1") -> NewMessage:
    return NewMessage(
        id=uuid4(), role="user", content=content, idempotency_key=key, fingerprint=fingerprint
    )


def start_for(path: str) -> RunStart | None:
    return starting() if path == "fast" else None


@pytest.mark.parametrize("path", PATHS)
async def test_a_stored_key_is_refused_naming_the_first_message(
    store: Store, make_session: MakeSession, path: str
) -> None:
    session = await make_session()
    first, _ = await store.add_user_message(session.id, keyed("wamid.1"))
    assert (first.idempotency_key, first.fingerprint) == ("wamid.1", "fp-1")

    start = start_for(path)
    with pytest.raises(DuplicateMessage) as refused:
        await store.add_user_message(session.id, keyed("wamid.1", "other", "fp-2"), start=start)

    assert refused.value.existing == first
    assert refused.value.existing.fingerprint == "fp-1"
    messages, total = await store.list_messages(session.id)
    assert total == 1
    assert messages == [first]
    if start is not None:
        assert await store.get_run(start.run_id) is None  # the duplicate opened no run
    # last_seq did not move: the next message takes the seq right after the first.
    after, _ = await store.add_user_message(session.id, keyed("wamid.2"))
    assert after.seq == first.seq + 1
    assert await store.find_message(session.id, "wamid.1") == first
    assert await store.find_message(session.id, "wamid.3") is None


async def test_a_key_is_scoped_to_its_session(store: Store, make_session: MakeSession) -> None:
    one, two = await make_session(), await make_session()
    a, _ = await store.add_user_message(one.id, keyed("same"))
    b, _ = await store.add_user_message(two.id, keyed("same"))
    plain, _ = await store.add_user_message(one.id, NewMessage(uuid4(), "user", "no key"))
    again, _ = await store.add_user_message(one.id, NewMessage(uuid4(), "user", "no key"))

    assert a.id != b.id
    assert await store.find_message(one.id, "same") == a
    assert await store.find_message(two.id, "same") == b
    assert (plain.idempotency_key, again.idempotency_key) == (None, None)


async def test_a_duplicate_of_a_message_a_run_answered_opens_nothing(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    start = starting()
    first, turn = await store.add_user_message(session.id, keyed("k"), start=start)
    assert turn is not None

    # The original's run is still open: a duplicate must not supersede it.
    with pytest.raises(DuplicateMessage):
        await store.add_user_message(session.id, keyed("k"), start=starting())

    run = await store.get_run(start.run_id)
    assert run is not None
    assert run.status == "running"
    assert [m.id for m in await store.unanswered(session.id)] == [first.id]


@pytest.fixture
async def session_lock(store: Store, store_url: str) -> AsyncIterator[Any]:
    """PostgreSQL only: hold a session's row lock from a connection of our own, so that
    inserts queue behind it and race for the key once it is let go."""
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(store_url)
    try:
        yield conn
    finally:
        await conn.close()


async def blocked_behind(store: Store, count: int) -> None:
    """Wait until ``count`` backends wait for locks: the first behind ours, the others
    behind it (a row lock's waiters queue), so they are counted as blocked by anyone. Asked
    outside the lock's transaction, whose view of pg_stat_activity would stay frozen."""
    assert isinstance(store, PostgresStore)
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND cardinality(pg_blocking_pids(pid)) > 0"
    )
    while await store.pool.fetchval(query) < count:
        await asyncio.sleep(0.005)  # polls another connection's state; the timeout bounds it


# PostgreSQL only: SQLite serialises every write on one connection, so there is no race.
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("path", PATHS)
async def test_two_concurrent_inserts_of_one_key_store_one_message(
    store: Store, make_session: MakeSession, session_lock: Any, path: str
) -> None:
    session = await make_session()
    transaction = session_lock.transaction()
    await transaction.start()
    await session_lock.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", session.id)
    starts = [start_for(path), start_for(path)]
    inserts = [
        asyncio.create_task(store.add_user_message(session.id, keyed("race"), start=start))
        for start in starts
    ]
    await blocked_behind(store, 2)  # both past any look, waiting to write
    await transaction.commit()

    results = await asyncio.gather(*inserts, return_exceptions=True)
    stored = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, DuplicateMessage)]
    assert (len(stored), len(refused)) == (1, 1), results
    winner, turn = stored[0]
    assert refused[0].existing == winner
    messages, total = await store.list_messages(session.id)
    assert (total, messages) == (1, [winner])
    if path == "fast":
        assert turn is not None
        loser = starts[results.index(refused[0])]
        assert loser is not None
        assert await store.get_run(loser.run_id) is None
    after, _ = await store.add_user_message(session.id, keyed("next"))
    assert after.seq == winner.seq + 1


async def test_many_concurrent_inserts_of_one_key_store_one_message(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    results = await asyncio.gather(
        *(store.add_user_message(session.id, keyed("burst")) for _ in range(10)),
        return_exceptions=True,
    )
    stored = [r[0] for r in results if isinstance(r, tuple)]
    assert len(stored) == 1, results
    assert all(
        isinstance(r, DuplicateMessage) and r.existing == stored[0]
        for r in results
        if not isinstance(r, tuple)
    ), results
    assert (await store.list_messages(session.id))[1] == 1
