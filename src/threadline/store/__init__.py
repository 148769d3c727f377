"""Conversation storage: the ``Store`` protocol and its PostgreSQL and SQLite implementations."""

from threadline.store.base import (
    Message,
    NewMessage,
    Reply,
    Run,
    RunStart,
    RunStatus,
    Session,
    Store,
    Turn,
)

__all__ = [
    "Message",
    "NewMessage",
    "Reply",
    "Run",
    "RunStart",
    "RunStatus",
    "Session",
    "Store",
    "Turn",
]
