"""Coordinators in this process on the real PostgreSQL and Redis, closed after each test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from threadline.agents import AgentRegistry
from threadline.agents.builtin import BUILTIN_AGENTS
from threadline.config import Settings
from threadline.coordination import TurnRequest
from threadline.coordination.redis import RedisCoordinator
from threadline.store import PostgresStore, Store

Connect = Callable[..., Awaitable[RedisCoordinator]]


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.connect(pg_url, min_size=1, max_size=4)
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def connect(pg_url: str, redis_url: str) -> AsyncIterator[Connect]:
    opened: list[RedisCoordinator] = []

    async def make(
        store: Store,
        *,
        sharded: bool = False,
        registry: AgentRegistry | None = None,
        **overrides: Any,
    ) -> RedisCoordinator:
        overrides.setdefault("redis_url", redis_url)
        settings = Settings(_env_file=None, database_url=pg_url, **overrides)  # type: ignore[call-arg]
        if registry is None:
            registry = AgentRegistry(BUILTIN_AGENTS, default_model="threadline:echo")
        coordinator = await RedisCoordinator.connect(settings, store, registry, sharded=sharded)
        opened.append(coordinator)
        return coordinator

    yield make
    for coordinator in opened:
        await coordinator.aclose()


def request(session_id: uuid.UUID, text: str) -> TurnRequest:
    return TurnRequest(session_id, "echo", text, "merge")
