"""Conversation storage: the ``Store`` protocol and its PostgreSQL and SQLite implementations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from threadline.store.base import (
    FINISHED,
    RUN_CANCELLED,
    Attempt,
    Delivery,
    DeliveryStatus,
    DuplicateMessage,
    EndStatus,
    Message,
    NewDelivery,
    NewMessage,
    Reply,
    Role,
    Run,
    RunError,
    RunStart,
    RunStatus,
    Session,
    Store,
    Turn,
)
from threadline.store.postgres import PostgresStore
from threadline.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from threadline.config import Settings


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """Connect to ``settings.database_url``, apply pending migrations, yield; close on exit."""
    store: PostgresStore | SQLiteStore
    if settings.backend == "postgres":
        store = await PostgresStore.connect(
            settings.database_url,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            statement_cache=settings.database_pooler == "none",
        )
    else:
        store = await SQLiteStore.connect(settings.database_url)
    try:
        await store.migrate()
        yield store
    finally:
        await store.aclose()


__all__ = [
    "FINISHED",
    "RUN_CANCELLED",
    "Attempt",
    "Delivery",
    "DeliveryStatus",
    "DuplicateMessage",
    "EndStatus",
    "Message",
    "NewDelivery",
    "NewMessage",
    "PostgresStore",
    "Reply",
    "Role",
    "Run",
    "RunError",
    "RunStart",
    "RunStatus",
    "SQLiteStore",
    "Session",
    "Store",
    "Turn",
    "open_store",
]
