"""Store fixtures: one ``store`` per backend, and a session factory that cleans up after itself.

The PostgreSQL database is shared by every test (and possibly by several test runs), so tests
never truncate: each one works in sessions of its own, under a user id nobody else uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import asyncpg
import pytest

from threadline.store import NewMessage, PostgresStore, Reply, RunStart, Session, SQLiteStore, Store

MakeSession = Callable[..., Awaitable[Session]]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened: PostgresStore | SQLiteStore
    if store_url.startswith("sqlite"):
        opened = await SQLiteStore.connect(store_url)
    else:
        opened = await PostgresStore.connect(store_url, min_size=1, max_size=10)
    try:
        await opened.migrate()
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def user_id() -> str:
    return f"test-user-{uuid4().hex}"


@pytest.fixture
async def make_session(store: Store, user_id: str) -> AsyncIterator[MakeSession]:
    created: list[UUID] = []

    async def make(agent: str = "echo", **kwargs: Any) -> Session:
        kwargs.setdefault("user_id", user_id)
        session = await store.create_session(agent, **kwargs)
        created.append(session.id)
        return session

    yield make
    for session_id in created:
        await store.delete_session(session_id)


def user(content: str = "hello") -> NewMessage:
    return NewMessage(id=uuid4(), role="user", content=content)


def starting(history_limit: int = 20, upto_seq: int | None = None) -> RunStart:
    return RunStart(uuid4(), "echo", "test:model", history_limit, upto_seq)


def answer(content: str = "hi", **usage: Any) -> Reply:
    return Reply(NewMessage(id=uuid4(), role="assistant", content=content), usage)


async def drain_loop_callbacks() -> None:
    """Run every callback already scheduled with ``call_soon`` (asyncpg's query loggers).

    Callbacks run in FIFO order, so once ours has run, every earlier one has too.
    """
    done = asyncio.Event()
    asyncio.get_running_loop().call_soon(done.set)
    await done.wait()


@pytest.fixture
async def fresh_pg_database(pg_url: str) -> Any:
    """A database of our own, dropped afterwards: migrations must start from nothing."""
    name = f"threadline_migrations_{uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlsplit(pg_url)._replace(path=f"/{name}").geturl()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
