"""The hot path costs at most two round-trips per turn, on every backend.

A turn on an idle session is ``add_user_message(..., start=...)`` then ``commit_run``. On
PostgreSQL a round-trip is a statement (asyncpg's query logger sees each one, including the
pool's reset-on-release if it were to run); on SQLite it is a hop into aiosqlite's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from tests.store.conftest import answer, drain_loop_callbacks, starting, user
from threadline.store import PostgresStore, SQLiteStore, Store

RESET_MARKERS = ("RESET ALL", "UNLISTEN", "CLOSE ALL", "pg_advisory_unlock_all")


async def turn(store: Store, session_id: UUID, between: Callable[[], None] = lambda: None) -> None:
    _, opened = await store.add_user_message(session_id, user(), start=starting())
    assert opened is not None
    between()
    assert await store.commit_run(session_id, opened.run.id, answer()) is not None


async def test_postgres_turn_is_two_statements_and_holds_no_connection(pg_url: str) -> None:
    queries: list[str] = []
    store = await PostgresStore.connect(
        pg_url, min_size=2, max_size=2, query_logger=lambda record: queries.append(record.query)
    )
    session = None
    try:
        await store.migrate()
        session = await store.create_session("echo", user_id=f"round-trips-{uuid4().hex}")
        # asyncpg prepares a statement on first use per connection, then caches it.
        for _ in range(2):
            await turn(store, session.id)
        await drain_loop_callbacks()
        warm_up, queries[:] = list(queries), []

        def no_connection_held() -> None:
            assert store.pool.get_idle_size() == store.pool.get_size() == 2

        await turn(store, session.id, between=no_connection_held)
        await drain_loop_callbacks()

        assert len(queries) == 2, queries  # add_user_message(start=...) and commit_run
        assert not [q for q in warm_up + queries if any(m in q for m in RESET_MARKERS)]
    finally:
        if session is not None:
            await store.delete_session(session.id)
        await store.aclose()


async def test_postgres_answer_for_is_one_statement_on_the_message_ids_index(pg_url: str) -> None:
    queries: list[str] = []
    store = await PostgresStore.connect(
        pg_url, min_size=1, max_size=1, query_logger=lambda record: queries.append(record.query)
    )
    session = None
    try:
        await store.migrate()
        session = await store.create_session("echo", user_id=f"round-trips-{uuid4().hex}")
        question, opened = await store.add_user_message(session.id, user(), start=starting())
        assert opened is not None
        await store.commit_run(session.id, opened.run.id, answer())
        await drain_loop_callbacks()
        queries[:] = []

        assert await store.answer_for(question.id) is not None
        await drain_loop_callbacks()
        assert len(queries) == 1, queries

        # Even on a table too small for the planner to care, the index must be usable.
        async with store.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = await conn.fetch(f"EXPLAIN {queries[0]}", question.id)
        assert any("runs_message_ids" in row[0] for row in plan), plan
    finally:
        if session is not None:
            await store.delete_session(session.id)
        await store.aclose()


async def test_query_logger_sees_a_default_pool_reset(pg_url: str) -> None:
    """Guards the test above: with asyncpg's default reset, the logger would have seen it."""
    queries: list[str] = []

    async def init(conn: Any) -> None:
        conn.add_query_logger(lambda record: queries.append(record.query))

    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1, init=init)
    try:
        await pool.fetchval("SELECT 1")
        await drain_loop_callbacks()
    finally:
        await pool.close()
    assert any(m in q for q in queries for m in RESET_MARKERS), queries


async def test_sqlite_turn_is_two_hops(tmp_path: Any, monkeypatch: Any) -> None:
    store = await SQLiteStore.connect(f"sqlite:///{tmp_path}/hops.db")
    try:
        await store.migrate()
        session = await store.create_session("echo")
        await turn(store, session.id)
        helper_calls: list[str] = []
        thread_hops: list[str] = []
        run = store._run
        execute_any: Any = store._conn._execute

        async def counting_run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            helper_calls.append(fn.__name__)
            return await run(fn, *args, **kwargs)

        async def counting_execute(fn: Any, *args: Any, **kwargs: Any) -> Any:
            thread_hops.append(fn.__name__)
            return await execute_any(fn, *args, **kwargs)

        monkeypatch.setattr(store, "_run", counting_run)
        monkeypatch.setattr(store._conn, "_execute", counting_execute)

        await turn(store, session.id)

        assert helper_calls == ["add", "commit"]
        assert len(thread_hops) == 2

        question, opened = await store.add_user_message(session.id, user(), start=starting())
        assert opened is not None
        await store.commit_run(session.id, opened.run.id, answer())
        thread_hops[:] = []
        assert await store.answer_for(question.id) is not None
        assert len(thread_hops) == 1
    finally:
        await store.aclose()
