"""The ``Store`` contract, run against every backend (the ``store`` fixture is parametrised)."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import pytest

from tests.store.conftest import MakeSession, answer, starting, user
from threadline.errors import InvalidRequest, SessionNotFound, StoreUnavailable
from threadline.store import NewMessage, PostgresStore, RunError, SQLiteStore, Store, open_store
from threadline.store.migrations import migrate_postgres


async def test_session_round_trip(store: Store, make_session: MakeSession, user_id: str) -> None:
    created = await make_session(name="chat", metadata={"topic": "tea", "n": [1, 2]})

    fetched = await store.get_session(created.id)
    assert fetched == created
    assert created.name == "chat"
    assert created.user_id == user_id
    assert created.metadata == {"topic": "tea", "n": [1, 2]}
    assert created.created_at.tzinfo is not None
    assert await store.find_session("chat", user_id) == created
    assert await store.find_session("chat", "someone-else") is None
    assert await store.get_session(uuid4()) is None


async def test_session_names_are_unique_per_user(
    store: Store, make_session: MakeSession, user_id: str
) -> None:
    await make_session(name="main")
    other = await make_session(name="main", user_id=f"{user_id}-other")
    await make_session(name=None)
    await make_session(name=None)  # unnamed sessions never collide

    with pytest.raises(InvalidRequest, match="'main'"):
        await store.create_session("echo", name="main", user_id=user_id)
    assert await store.find_session("main", f"{user_id}-other") == other


async def test_sessions_without_user_share_one_namespace(
    store: Store, make_session: MakeSession
) -> None:
    name = f"anonymous-{uuid4().hex}"
    first = await make_session(name=name, user_id=None)
    with pytest.raises(InvalidRequest):
        await store.create_session("echo", name=name)
    assert await store.find_session(name) == first


async def test_concurrent_get_or_create_returns_one_session(store: Store, user_id: str) -> None:
    sessions = await asyncio.gather(
        *(store.get_or_create_session("shared", agent="echo", user_id=user_id) for _ in range(20))
    )

    assert len({s.id for s in sessions}) == 1
    assert await store.find_session("shared", user_id) == sessions[0]
    await store.delete_session(sessions[0].id)


async def test_list_sessions_newest_first_with_total(
    store: Store, make_session: MakeSession, user_id: str
) -> None:
    created = [await make_session(name=f"s{i}") for i in range(5)]
    newest_first = [s.id for s in reversed(created)]

    pages = [await store.list_sessions(user_id=user_id, limit=2, offset=o) for o in (0, 2, 4)]
    assert [total for _, total in pages] == [5, 5, 5]
    assert [s.id for page, _ in pages for s in page] == newest_first
    assert await store.list_sessions(user_id=user_id, offset=10) == ([], 5)


async def test_list_sessions_without_user_lists_only_sessions_without_user(
    store: Store, make_session: MakeSession
) -> None:
    owned = await make_session()
    anonymous = await make_session(user_id=None)
    for no_user in (None, ""):  # one namespace, as in find_session
        listed, _ = await store.list_sessions(user_id=no_user, limit=1000)
        assert anonymous.id in {s.id for s in listed}
        assert owned.id not in {s.id for s in listed}
        assert all(not s.user_id for s in listed)


async def test_delete_session_cascades(store: Store, make_session: MakeSession) -> None:
    session = await make_session()
    _, turn = await store.add_user_message(session.id, user(), start=starting())
    assert turn is not None

    assert await store.delete_session(session.id) is True
    assert await store.get_session(session.id) is None
    assert await store.get_run(turn.run.id) is None
    assert await store.list_messages(session.id) == ([], 0)
    assert await store.delete_session(session.id) is False


async def test_concurrent_inserts_get_gapless_seqs(store: Store, make_session: MakeSession) -> None:
    session = await make_session()

    inserted = await asyncio.gather(
        *(store.add_user_message(session.id, user()) for _ in range(50))
    )

    assert sorted(m.seq for m, _ in inserted) == list(range(1, 51))
    page, total = await store.list_messages(session.id, limit=20, offset=10)
    assert total == 50
    assert [m.seq for m in page] == list(range(11, 31))


async def test_insert_into_missing_session_raises(store: Store) -> None:
    with pytest.raises(SessionNotFound):
        await store.add_user_message(uuid4(), user())
    with pytest.raises(SessionNotFound):
        await store.add_user_message(uuid4(), user(), start=starting())


async def test_turn_opens_a_run_and_commits_the_reply(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, turn = await store.add_user_message(session.id, user("hi"), start=starting())

    assert turn is not None
    assert (turn.run.status, turn.run.message_ids, turn.run.upto_seq) == ("running", (first.id,), 1)
    assert turn.run.started_at is not None
    assert turn.prompt == [first]
    assert turn.history == []

    reply = await store.commit_run(session.id, turn.run.id, answer("hello", input_tokens=3))
    assert reply is not None
    assert (reply.seq, reply.role, reply.run_id) == (2, "assistant", turn.run.id)
    run = await store.get_run(turn.run.id)
    assert run is not None
    assert (run.status, run.reply_message_id, run.usage) == (
        "succeeded",
        reply.id,
        {"input_tokens": 3},
    )
    assert run.finished_at is not None
    assert await store.unanswered(session.id) == []

    second, turn = await store.add_user_message(session.id, user("again"), start=starting())
    assert turn is not None
    assert turn.history == [first, reply]
    assert turn.prompt == [second]


async def test_a_run_opened_with_a_message_may_stop_before_it(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, _ = await store.add_user_message(session.id, user("one"))
    second, turn = await store.add_user_message(session.id, user("two"), start=starting(upto_seq=1))

    assert turn is not None
    assert turn.prompt == [first]
    assert turn.history == []  # an unanswered message is a later prompt, never history
    assert await store.commit_run(session.id, turn.run.id, answer()) is not None
    assert await store.unanswered(session.id) == [second]
    nothing = starting(upto_seq=1)
    third, no_turn = await store.add_user_message(session.id, user("three"), start=nothing)
    assert (third.seq, no_turn) == (4, None)
    assert await store.get_run(nothing.run_id) is None


async def test_superseded_run_cannot_commit(store: Store, make_session: MakeSession) -> None:
    session = await make_session()
    first, old = await store.add_user_message(session.id, user("one"), start=starting())
    second, new = await store.add_user_message(session.id, user("two"), start=starting())
    assert old is not None
    assert new is not None

    assert await store.commit_run(session.id, old.run.id, answer()) is None
    assert (await store.list_messages(session.id))[1] == 2  # the fenced commit wrote nothing
    await store.finish_run(session.id, old.run.id, "superseded", superseded_by=new.run.id)

    assert new.prompt == [first, second]
    reply = await store.commit_run(session.id, new.run.id, answer())
    assert reply is not None
    old_run = await store.get_run(old.run.id)
    assert old_run is not None
    assert (old_run.status, old_run.superseded_by) == ("superseded", new.run.id)
    assert old_run.reply_message_id is None


async def test_commit_racing_a_new_run_never_answers_twice(
    store: Store, make_session: MakeSession
) -> None:
    for _ in range(10):
        session = await make_session()
        _, first = await store.add_user_message(session.id, user("one"), start=starting())
        second, _ = await store.add_user_message(session.id, user("two"))
        assert first is not None

        committed, racer = await asyncio.gather(
            store.commit_run(session.id, first.run.id, answer()),
            store.start_run(session.id, starting(upto_seq=second.seq)),
        )
        assert racer is not None
        if committed is None:  # the new run took the fence first and answers both
            assert [m.seq for m in racer.prompt] == [1, 2]
        else:
            assert [m.seq for m in racer.prompt] == [2]
            assert committed in racer.history
        assert await store.commit_run(session.id, racer.run.id, answer()) is not None
        messages, _ = await store.list_messages(session.id)
        replies = [m for m in messages if m.role == "assistant"]
        assert len(replies) == (1 if committed is None else 2)
        assert await store.unanswered(session.id) == []


async def test_concurrent_turns_each_see_every_unanswered_message(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()

    results = await asyncio.gather(
        *(store.add_user_message(session.id, user(), start=starting()) for _ in range(20))
    )

    for message, turn in results:
        assert turn is not None
        assert [m.seq for m in turn.prompt] == list(range(1, message.seq + 1))
    commits = await asyncio.gather(
        *(store.commit_run(session.id, t.run.id, answer()) for _, t in results if t)
    )
    winners = [turn for (_, turn), c in zip(results, commits, strict=True) if c is not None]
    assert len(winners) == 1
    assert winners[0] is not None
    assert winners[0].run.upto_seq == 20


async def test_start_run_with_nothing_to_answer_writes_nothing(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    _, turn = await store.add_user_message(session.id, user(), start=starting())
    assert turn is not None
    await store.commit_run(session.id, turn.run.id, answer())

    late = starting(upto_seq=1)
    assert await store.start_run(session.id, late) is None
    assert await store.get_run(late.run_id) is None
    assert await store.start_run(uuid4(), starting(upto_seq=1)) is None


async def test_side_effects_of_a_superseded_run_reach_the_next_history(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, old = await store.add_user_message(session.id, user(), start=starting())
    assert old is not None
    tool_rows = [
        NewMessage(uuid4(), "tool", "called get_weather", payload=b'[{"kind": "request"}]'),
        NewMessage(uuid4(), "tool", "sunny", channel_payload={"source": "tool"}),
    ]

    await store.finish_run(
        session.id, old.run.id, "superseded", superseded_by=uuid4(), side_effects=tool_rows
    )
    await store.finish_run(session.id, old.run.id, "failed", side_effects=tool_rows[:1])

    messages, total = await store.list_messages(session.id)
    assert total == 3  # the second finish_run found the run finished and did nothing
    assert [(m.seq, m.run_id) for m in messages[1:]] == [(2, old.run.id), (3, old.run.id)]
    assert messages[1].payload == b'[{"kind": "request"}]'
    assert messages[2].channel_payload == {"source": "tool"}
    assert await store.commit_run(session.id, old.run.id, answer()) is None  # fence released

    turn = await store.start_run(session.id, starting(upto_seq=1))
    assert turn is not None
    assert turn.prompt == [first]
    assert turn.history == messages[1:]


async def test_failed_run_answers_its_messages_by_failure(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, failed = await store.add_user_message(session.id, user("one"), start=starting())
    assert failed is not None

    ended = await store.finish_run(
        session.id, failed.run.id, "failed", error=RunError("tool_error", "tool 'x' failed")
    )

    run = await store.get_run(failed.run.id)
    assert run is not None
    assert ended == run
    assert (run.status, run.error_code, run.error) == ("failed", "tool_error", "tool 'x' failed")
    assert run.finished_at is not None
    # Answered by failure: never prompted again, still in history, and found by answer_for.
    assert await store.unanswered(session.id) == []
    assert await store.answer_for(first.id) == (run, None)
    second, next_turn = await store.add_user_message(session.id, user("two"), start=starting())
    assert next_turn is not None
    assert next_turn.prompt == [second]
    assert next_turn.history == [first]
    assert await store.commit_run(session.id, next_turn.run.id, answer()) is not None
    assert await store.finish_run(session.id, failed.run.id, "failed") is None  # ended already


async def test_cancelled_run_leaves_its_messages_for_the_next_run(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    first, cancelled = await store.add_user_message(session.id, user("one"), start=starting())
    assert cancelled is not None

    await store.finish_run(
        session.id, cancelled.run.id, "cancelled", error=RunError("shutting_down", "shut down")
    )

    run = await store.get_run(cancelled.run.id)
    assert run is not None
    assert (run.status, run.error_code) == ("cancelled", "shutting_down")
    assert await store.unanswered(session.id) == [first]
    second, retry = await store.add_user_message(session.id, user("two"), start=starting())
    assert retry is not None
    assert retry.prompt == [first, second]
    assert await store.commit_run(session.id, retry.run.id, answer()) is not None
    assert await store.unanswered(session.id) == []


async def test_history_window_and_full_prompt(store: Store, make_session: MakeSession) -> None:
    session = await make_session()
    for i in range(3):
        _, turn = await store.add_user_message(session.id, user(f"q{i}"), start=starting())
        assert turn is not None
        await store.commit_run(session.id, turn.run.id, answer(f"a{i}"))
    pending = [(await store.add_user_message(session.id, user(f"p{i}")))[0] for i in range(3)]

    turn = await store.start_run(session.id, starting(history_limit=3, upto_seq=8))
    assert turn is not None
    assert [m.content for m in turn.history] == ["a1", "q2", "a2"]
    assert turn.prompt == pending[:2]  # upto_seq=8 stops before the third
    assert turn.run.upto_seq == 8
    assert await store.unanswered(session.id) == pending

    turn = await store.start_run(session.id, starting(history_limit=0, upto_seq=9))
    assert turn is not None
    assert turn.history == []
    assert turn.prompt == pending


async def test_ping_and_closed_store(store_url: str) -> None:
    opened = await (
        SQLiteStore.connect(store_url)
        if store_url.startswith("sqlite")
        else PostgresStore.connect(store_url, min_size=1, max_size=1)
    )
    await opened.ping()
    await opened.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):
        await opened.ping()


async def test_open_store_yields_a_migrated_store(make_settings: Any, store_url: str) -> None:
    settings = make_settings(database_url=store_url, pool_min_size=1, pool_max_size=2)
    async with open_store(settings) as opened:
        assert opened.backend == settings.backend
        assert await opened.list_sessions(user_id=f"nobody-{uuid4().hex}") == ([], 0)


async def test_unreachable_postgres_is_store_unavailable() -> None:
    url = "postgresql://postgres@127.0.0.1:1/test"
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        await PostgresStore.connect(url, min_size=1, connect_timeout=5)
    with pytest.raises(StoreUnavailable):
        await migrate_postgres(url, connect_timeout=5)


async def test_unopenable_sqlite_is_store_unavailable(tmp_path: Any) -> None:
    with pytest.raises(StoreUnavailable, match="cannot open SQLite"):
        await SQLiteStore.connect(f"sqlite:///{tmp_path}/missing-dir/db.sqlite")


async def test_a_seeded_history_is_context_never_a_prompt(
    store: Store, make_session: MakeSession
) -> None:
    session = await make_session()
    brought = [
        NewMessage(id=uuid4(), role="user", content="my name is Ada"),
        NewMessage(id=uuid4(), role="assistant", content="hello Ada"),
    ]
    assert await store.seed_history(session.id, brought)
    assert await store.unanswered(session.id) == []
    # Only into a session without messages: a second seed writes nothing.
    assert not await store.seed_history(session.id, [NewMessage(uuid4(), "user", "again")])

    message, turn = await store.add_user_message(session.id, user("who am I?"), start=starting())

    assert message.seq == 3
    assert turn is not None
    assert [m.content for m in turn.history] == ["my name is Ada", "hello Ada"]
    assert [m.content for m in turn.prompt] == ["who am I?"]
