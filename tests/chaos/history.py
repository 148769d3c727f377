"""What a chaos run saw and what it found stored: plain values, so the checker is a pure function.

Every time is seconds since the epoch on the machine's clock (``time.time()`` in the harness,
``timestamptz`` from PostgreSQL, which runs on the same machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

import asyncpg

FaultKind = Literal["kill", "redis", "postgres", "partition"]
RequestKind = Literal["load", "probe", "final"]


@dataclass(frozen=True, slots=True)
class Request:
    """One ``POST /agent/{name}/run`` as the client saw it.

    ``status`` is None when no HTTP response came back; ``error`` then says why
    (``"timeout"``, or the transport exception's class name).
    """

    session_id: UUID
    content: str
    server: int
    start: float
    end: float
    status: int | None
    code: str | None = None
    error: str | None = None
    run_id: UUID | None = None
    message_ids: tuple[UUID, ...] = ()
    kind: RequestKind = "load"
    # An error body's message (and ``run_id`` above, when the error names the run).
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def latency(self) -> float:
        return self.end - self.start

    def describe(self) -> str:
        outcome = f"{self.status} {self.code or ''}".strip() if self.status else self.error
        detail = f" ({self.detail[:120]!r})" if self.detail else ""
        return (
            f"{self.kind} {self.content!r} session={self.session_id} server={self.server} "
            f"-> {outcome}{detail} in {self.latency:.2f}s run={self.run_id}"
        )


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault, from when it began to when the service was whole again.

    ``server`` is the process killed or partitioned; None for an outage of Redis or
    PostgreSQL, which every process sees. ``services`` are what became unreachable (for a
    partition, what the process was cut from). For a kill, ``end`` is when the restarted
    process answered ``/health`` again.
    """

    kind: FaultKind
    start: float
    end: float
    server: int | None = None
    detail: str = ""
    services: tuple[str, ...] = ()

    def covers(self, start: float, end: float) -> bool:
        """Whether a request in flight from ``start`` to ``end`` overlapped the fault."""
        return start <= self.end and end >= self.start


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: UUID
    session_id: UUID
    seq: int
    role: str
    content: str
    run_id: UUID | None
    created_at: float


@dataclass(frozen=True, slots=True)
class StoredRun:
    id: UUID
    session_id: UUID
    status: str
    message_ids: tuple[UUID, ...]
    reply_message_id: UUID | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def opened_at(self) -> float:
        return self.started_at if self.started_at is not None else self.created_at


@dataclass(slots=True)
class History:
    """Everything the client sent and every fault the chaos loop injected."""

    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)


@dataclass(slots=True)
class Snapshot:
    """The chaos sessions' rows once the run is quiescent.

    ``unfinished_at_settle`` are the runs still ``queued`` or ``running`` once the system had
    settled, before the final round: a later run of the session closes such a zombie (as
    ``superseded``), so the final rows alone would hide it.
    """

    messages: list[StoredMessage] = field(default_factory=list)
    runs: list[StoredRun] = field(default_factory=list)
    unfinished_at_settle: list[StoredRun] = field(default_factory=list)


async def snapshot(db: asyncpg.Pool, user_id: str) -> Snapshot:
    """Every message and run of ``user_id``'s sessions, as the checker reads them."""
    messages = await db.fetch(
        """SELECT m.id, m.session_id, m.seq, m.role, m.content, m.run_id,
                  extract(epoch FROM m.created_at)::float8 AS created_at
           FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.user_id = $1""",
        user_id,
    )
    runs = await db.fetch(
        """SELECT r.id, r.session_id, r.status, r.message_ids, r.reply_message_id,
                  extract(epoch FROM r.created_at)::float8 AS created_at,
                  extract(epoch FROM r.started_at)::float8 AS started_at,
                  extract(epoch FROM r.finished_at)::float8 AS finished_at
           FROM runs r JOIN sessions s ON s.id = r.session_id WHERE s.user_id = $1""",
        user_id,
    )
    return Snapshot(
        [StoredMessage(**dict(row)) for row in messages],
        [StoredRun(**{**dict(row), "message_ids": tuple(row["message_ids"])}) for row in runs],
    )
