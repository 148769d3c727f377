"""Runs across the fence, on every backend: a run fenced out by a new one is closed with it, and
a message's answer can be found from the message alone."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Literal
from uuid import UUID, uuid4

import pytest

from tests.store.conftest import MakeSession, answer, starting, user
from threadline.store import (
    RUN_CANCELLED,
    PostgresStore,
    RunError,
    RunStart,
    SQLiteStore,
    Store,
    Turn,
)

SHUTDOWN = RunError("shutting_down", "the server shut down mid-run")

Opener = Literal["start_run", "add_user_message"]


async def open_run(store: Store, session_id: UUID, how: Opener, start: RunStart) -> Turn | None:
    """Open a run the way a process taking a session over would: with or without a message."""
    if how == "start_run":
        return await store.start_run(session_id, start)
    _, turn = await store.add_user_message(session_id, user("takeover"), start=start)
    return turn


async def set_fence(store: Store, session_id: UUID, run_id: UUID) -> None:
    """Make ``run_id`` the session's current run behind the store's back."""
    if isinstance(store, PostgresStore):
        query = "UPDATE sessions SET current_run_id = $1 WHERE id = $2"
        await store.pool.execute(query, run_id, session_id)
        return
    assert isinstance(store, SQLiteStore)

    def point(db: sqlite3.Connection) -> None:
        query = "UPDATE sessions SET current_run_id = ? WHERE id = ?"
        db.execute(query, (str(run_id), str(session_id)))

    await store._run(point)


@pytest.mark.parametrize("how", ["start_run", "add_user_message"])
async def test_opening_a_run_closes_the_run_it_fences_out(
    store: Store, make_session: MakeSession, how: Opener
) -> None:
    session = await make_session()
    first, dead = await store.add_user_message(session.id, user("one"), start=starting())
    assert dead is not None  # its process is gone: nobody will ever finish this run

    taken = await open_run(store, session.id, how, starting(upto_seq=first.seq))

    assert taken is not None
    assert taken.prompt[0] == first
    closed = await store.get_run(dead.run.id)
    assert closed is not None
    assert (closed.status, closed.superseded_by) == ("superseded", taken.run.id)
    assert closed.finished_at is not None
    assert (closed.reply_message_id, closed.error) == (None, None)
    assert await store.commit_run(session.id, dead.run.id, answer()) is None
    opened = await store.get_run(taken.run.id)
    assert opened is not None
    assert (opened.status, opened.finished_at) == ("running", None)
    assert await store.commit_run(session.id, taken.run.id, answer()) is not None


@pytest.mark.parametrize("how", ["start_run", "add_user_message"])
async def test_a_run_that_finished_itself_keeps_its_own_status(
    store: Store, make_session: MakeSession, how: Opener
) -> None:
    session = await make_session()
    first, old = await store.add_user_message(session.id, user("one"), start=starting())
    assert old is not None
    planned = uuid4()
    await store.finish_run(session.id, old.run.id, "superseded", superseded_by=planned)
    finished = await store.get_run(old.run.id)

    taken = await open_run(store, session.id, how, starting(upto_seq=first.seq))

    assert taken is not None
    assert await store.get_run(old.run.id) == finished
    assert finished is not None
    assert (finished.status, finished.superseded_by) == ("superseded", planned)


@pytest.mark.parametrize("how", ["start_run", "add_user_message"])
async def test_a_finished_run_still_named_by_the_fence_keeps_its_status(
    store: Store, make_session: MakeSession, how: Opener
) -> None:
    session = await make_session()
    first, failed = await store.add_user_message(session.id, user("one"), start=starting())
    assert failed is not None
    await store.finish_run(session.id, failed.run.id, "cancelled", error=SHUTDOWN)
    before = await store.get_run(failed.run.id)
    await set_fence(store, session.id, failed.run.id)

    taken = await open_run(store, session.id, how, starting(upto_seq=first.seq))

    assert taken is not None
    assert await store.get_run(failed.run.id) == before


async def test_a_run_that_opens_nothing_closes_nothing(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    _, running = await store.add_user_message(session.id, user("one"), start=starting())
    assert running is not None

    _, none = await store.add_user_message(session.id, user("two"), start=starting(upto_seq=0))
    assert none is None
    assert await store.start_run(session.id, starting(upto_seq=0)) is None

    still = await store.get_run(running.run.id)
    assert still is not None
    assert still.status == "running"
    assert await store.commit_run(session.id, running.run.id, answer()) is not None


@pytest.mark.parametrize("how", ["start_run", "add_user_message"])
async def test_concurrent_openings_leave_one_open_run_and_one_chain(
    store: Store, make_session: MakeSession, how: Opener
) -> None:
    session = await make_session()
    first, _ = await store.add_user_message(session.id, user())

    turns = await asyncio.gather(
        *(open_run(store, session.id, how, starting(upto_seq=first.seq)) for _ in range(20))
    )

    runs = [await store.get_run(t.run.id) for t in turns if t is not None]
    assert len(runs) == 20
    open_runs = [r for r in runs if r is not None and r.status == "running"]
    assert len(open_runs) == 1
    by_id = {r.id: r for r in runs if r is not None}
    # Each run names the run opened right after it; following the names visits every run.
    successors = {r.superseded_by for r in by_id.values() if r.superseded_by is not None}
    (head,) = set(by_id) - successors
    chain = [by_id[head]]
    while chain[-1].superseded_by is not None:
        chain.append(by_id[chain[-1].superseded_by])
    assert len(chain) == 20
    assert chain[-1] == open_runs[0]


async def test_finish_racing_a_takeover_leaves_no_open_run_behind(
    store: Store, make_session: MakeSession
) -> None:
    for _ in range(20):
        session = await make_session()
        first, old = await store.add_user_message(session.id, user("one"), start=starting())
        assert old is not None

        _, taken = await asyncio.gather(
            store.finish_run(session.id, old.run.id, "cancelled", error=SHUTDOWN),
            store.start_run(session.id, starting(upto_seq=first.seq)),
        )

        assert taken is not None
        closed = await store.get_run(old.run.id)
        assert closed is not None
        # Whichever write came first decided how the old run ended; it did end.
        assert (closed.status, closed.superseded_by, closed.error) in {
            ("cancelled", None, SHUTDOWN.message),
            ("superseded", taken.run.id, None),
        }
        assert await store.commit_run(session.id, taken.run.id, answer()) is not None


async def test_answer_for_finds_the_reply_of_every_message_a_run_answered(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, _ = await store.add_user_message(session.id, user("one"))
    second, failed = await store.add_user_message(session.id, user("two"), start=starting())
    assert failed is not None
    await store.finish_run(session.id, failed.run.id, "cancelled", error=SHUTDOWN)
    assert await store.answer_for(first.id) is None  # only a cancelled run holds it so far

    retry = await store.start_run(session.id, starting(upto_seq=second.seq))
    assert retry is not None
    assert await store.answer_for(second.id) is None  # running, not answered yet
    reply = await store.commit_run(session.id, retry.run.id, answer("both"))
    assert reply is not None

    for message in (first, second):
        found = await store.answer_for(message.id)
        assert found is not None
        run, message_reply = found
        assert run == await store.get_run(retry.run.id)
        assert (run.status, run.message_ids) == ("succeeded", (first.id, second.id))
        assert message_reply == reply


async def test_answer_for_unanswered_unknown_and_reply_ids_is_none(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    _, turn = await store.add_user_message(session.id, user("one"), start=starting())
    assert turn is not None
    reply = await store.commit_run(session.id, turn.run.id, answer())
    assert reply is not None
    pending, _ = await store.add_user_message(session.id, user("two"))

    assert await store.answer_for(pending.id) is None
    assert await store.answer_for(uuid4()) is None
    assert await store.answer_for(reply.id) is None  # a reply is not a question


async def test_answer_for_ignores_other_sessions(store: Store, make_session: MakeSession) -> None:
    asked = await make_session()
    other = await make_session()
    question, turn = await store.add_user_message(asked.id, user("one"), start=starting())
    assert turn is not None
    _, elsewhere = await store.add_user_message(other.id, user("one"), start=starting())
    assert elsewhere is not None
    await store.commit_run(other.id, elsewhere.run.id, answer("elsewhere"))
    assert await store.answer_for(question.id) is None

    reply = await store.commit_run(asked.id, turn.run.id, answer("here"))

    found = await store.answer_for(question.id)
    assert found is not None
    assert found[1] == reply


@pytest.mark.parametrize(
    ("error", "closes"),
    [(RunError(RUN_CANCELLED, "cancelled by a client"), True), (SHUTDOWN, False)],
)
async def test_a_cancel_by_a_client_answers_its_messages_and_a_shutdown_does_not(
    store: Store, make_session: MakeSession, error: RunError, closes: bool
) -> None:
    session = await make_session()
    message, turn = await store.add_user_message(session.id, user("stop me"), start=starting())
    assert turn is not None

    run = await store.finish_run(session.id, turn.run.id, "cancelled", error=error)

    assert run is not None
    assert (run.status, run.error_code) == ("cancelled", error.code)
    pending = [m.id for m in await store.unanswered(session.id)]
    found = await store.answer_for(message.id)
    if closes:
        assert pending == []
        assert found is not None
        assert found[0].id == turn.run.id
        assert found[1] is None
    else:
        assert pending == [message.id]
        assert found is None
