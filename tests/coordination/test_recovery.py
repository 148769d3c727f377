"""A message whose insert committed while its caller heard 503 (the reply was lost on the way
back, or the owner could not be told) is answered anyway, without waiting for the session's
next message: on SQLite in one process, and through Redis on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.coordination.conftest import Connect, request
from threadline.agents import AgentRegistry
from threadline.agents.builtin import BUILTIN_AGENTS
from threadline.config import Settings
from threadline.coordination.local import LocalCoordinator
from threadline.errors import CoordinatorUnavailable, StoreUnavailable
from threadline.store import PostgresStore, SQLiteStore, Store


class LostReply:
    """Wraps a store: the next insert commits, then its caller is told the store failed."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.lose = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def add_user_message(self, *args: Any, **kwargs: Any) -> Any:
        stored = await self._store.add_user_message(*args, **kwargs)
        if self.lose:
            self.lose = False
            raise StoreUnavailable("PostgreSQL is unavailable: connection lost after COMMIT")
        return stored


async def answered(store: Store, session_id: uuid.UUID) -> str:
    """The reply that answers the session's only user message, once a run stored it."""
    messages, _ = await store.list_messages(session_id)
    (message,) = [m for m in messages if m.role == "user"]
    while (found := await store.answer_for(message.id)) is None:
        await asyncio.sleep(0.01)  # a run in the background answers it
    reply = found[1]
    assert reply is not None
    return reply.content


async def test_in_one_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/recovery.db"
    sqlite = await SQLiteStore.connect(url)
    await sqlite.migrate()
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    registry = AgentRegistry(BUILTIN_AGENTS, default_model="threadline:echo")
    coordinator = LocalCoordinator(LostReply(sqlite), registry, settings)  # type: ignore[arg-type]
    try:
        session = await sqlite.create_session("echo")
        with pytest.raises(StoreUnavailable):
            await coordinator.submit(request(session.id, "did this land?"))
        assert await answered(sqlite, session.id) == "echo: did this land?"
    finally:
        await coordinator.aclose()
        await sqlite.aclose()


async def test_at_the_owner_through_redis(store: PostgresStore, connect: Connect) -> None:
    coordinator = await connect(LostReply(store))
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    with pytest.raises(StoreUnavailable):
        await coordinator.submit(request(session.id, "did this land?"))
    assert await answered(store, session.id) == "echo: did this land?"


async def test_at_another_process_through_redis(store: PostgresStore, connect: Connect) -> None:
    owner = await connect(store)
    other = await connect(LostReply(store))
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await owner._leases.claim(session.id)  # `other` stores, `owner` runs
    with pytest.raises(StoreUnavailable):
        await other.submit(request(session.id, "did this land?"))
    assert await answered(store, session.id) == "echo: did this land?"


async def test_when_the_owner_could_not_be_told(store: PostgresStore, connect: Connect) -> None:
    owner = await connect(store)
    other = await connect(store)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await owner._leases.claim(session.id)
    nudge = other._leases.nudge
    calls = 0

    async def unreachable_once(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise CoordinatorUnavailable("Redis is unreachable: injected")
        return await nudge(*args)

    other._leases.nudge = unreachable_once  # type: ignore[method-assign]
    with pytest.raises(CoordinatorUnavailable):
        await other.submit(request(session.id, "did this land?"))
    assert await answered(store, session.id) == "echo: did this land?"


class DiesAfterInsert(LostReply):
    """The insert commits, then the process "dies": nothing after it runs, no nudge, no
    recovery (this process's own code never learns what happened)."""

    async def add_user_message(self, *args: Any, **kwargs: Any) -> Any:
        await self._store.add_user_message(*args, **kwargs)
        raise asyncio.CancelledError  # as good as gone: its task ends here


async def test_when_the_process_that_stored_it_died_before_telling_the_owner(
    store: PostgresStore, connect: Connect
) -> None:
    owner = await connect(store, lease_ttl_ms=1000)
    dying = await connect(DiesAfterInsert(store), lease_ttl_ms=1000)
    session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
    assert await owner._leases.claim(session.id)  # idle: the owner lets it go at its renewal
    with pytest.raises(asyncio.CancelledError):
        await dying.submit(request(session.id, "did this land?"))
    assert await answered(store, session.id) == "echo: did this land?"
