"""``PostgresStore``: the ``Store`` on an asyncpg pool.

Every method sends one statement through ``pool.fetch*``, so a connection is held only while a
statement is in flight and nothing spans two awaits of the caller. Writes that touch several
tables are single statements built from data-modifying CTEs, which PostgreSQL runs atomically.

Snapshot caveat. Under READ COMMITTED a statement that waits for the session row lock works on
the row's *latest* version once it gets it, but reads every other row through the snapshot taken
when it began. A statement that builds a prompt from ``messages`` could therefore miss a message
committed while it waited. Those statements (``add_user_message`` with ``start``, ``start_run``)
guard their session UPDATE with ``last_seq``/``answered_seq`` as read in the snapshot: every
writer that adds messages bumps ``last_seq`` in the same statement, so equal counters mean the
snapshot holds every message. The guard compares ``current_run_id`` too, so that the run being
fenced out is the one the snapshot saw, and its row is visible to the same statement, which
closes it as ``superseded`` if it is still open. When the guard fails nothing is written and the
statement is rerun in a transaction after ``SELECT ... FOR UPDATE`` on the session, whose later
snapshot is complete. That slow path runs only when writers collide on one session.

The SQL text lives in ``_pg_sql``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import asyncpg

from threadline.errors import InvalidRequest, SessionNotFound, StoreUnavailable
from threadline.store import _pg_sql as sql
from threadline.store.base import (
    Attempt,
    Delivery,
    DeliveryStatus,
    DuplicateMessage,
    EndStatus,
    Message,
    NewDelivery,
    NewMessage,
    Reply,
    Run,
    RunError,
    RunStart,
    Session,
    Turn,
    closes_messages,
)
from threadline.store.migrations import migrate_postgres

QueryLogger = Callable[[Any], object]

COMMAND_TIMEOUT_S = 30.0

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
    # What a restart looks like from inside the driver: "connection is closed", "pool is
    # closing", or a connection left half-way through the protocol ("cannot switch to state
    # 12; protocol is in the failed state").
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# InterfaceErrors that mean *we* passed something wrong (an argument asyncpg cannot encode, a
# bad DSN): a fault to fix, not an outage to wait out, so they stay 500s.
_MISUSE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
)
# Errors after which a pooled connection may still look open but can never work again.
_BROKEN: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


class PostgresStore:
    """The ``Store`` on PostgreSQL. Build it with ``await PostgresStore.connect(url)``."""

    backend: Literal["sqlite", "postgres"] = "postgres"

    def __init__(
        self,
        pool: Any,
        url: str,
        *,
        connect_timeout: float = 10.0,
        statement_cache: bool = True,
    ) -> None:
        self._pool = pool
        self._url = url
        self._connect_timeout = connect_timeout
        self._statement_cache = statement_cache
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        connect_timeout: float = 10.0,
        statement_cache: bool = True,
        query_logger: QueryLogger | None = None,
    ) -> PostgresStore:
        """Open the pool. ``query_logger`` is added to every connection (tests count queries).

        ``statement_cache=False`` is for a transaction-mode pooler (PgBouncer) in front of
        PostgreSQL: asyncpg then prepares every statement unnamed, in the same round trip as
        its execution, so nothing refers to a server connection that the pooler may have
        handed to another client since. It costs PostgreSQL a parse per statement.
        """

        async def init(conn: Any) -> None:
            for typename in ("json", "jsonb"):
                await conn.set_type_codec(
                    typename, schema="pg_catalog", encoder=json.dumps, decoder=json.loads
                )
            if query_logger is not None:
                conn.add_query_logger(query_logger)

        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                # A database that stops answering mid-statement must surface as a 503 rather
                # than hold the caller (and a shutdown waiting for inserts) forever.
                command_timeout=COMMAND_TIMEOUT_S,
                init=init,
                reset=_keep_session,
                statement_cache_size=100 if statement_cache else 0,
            )
        except _UNAVAILABLE as exc:
            if isinstance(exc, _MISUSE):
                raise
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {_redact(url)!r}: {exc}"
            ) from exc
        return cls(pool, url, connect_timeout=connect_timeout, statement_cache=statement_cache)

    @property
    def pool(self) -> Any:
        return self._pool

    async def migrate(self) -> list[int]:
        """Apply pending migrations (on a dedicated connection); return the versions applied."""
        return await migrate_postgres(
            self._url,
            connect_timeout=self._connect_timeout,
            statement_cache_size=100 if self._statement_cache else 0,
        )

    async def aclose(self) -> None:
        self._closed = True
        await self._pool.close()

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def create_session(
        self,
        agent: str,
        *,
        name: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        try:
            rows = await self._fetch(
                sql.CREATE_SESSION, uuid4(), name, agent, user_id, metadata or {}
            )
        except asyncpg.UniqueViolationError:
            raise InvalidRequest(
                f"session name {name!r} is already taken for user {user_id!r}"
            ) from None
        return _session(rows[0])

    async def get_or_create_session(
        self,
        name: str,
        *,
        agent: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        # An empty result means the conflicting row committed after our snapshot was taken:
        # a rerun sees it. Bounded so that a create/delete storm cannot spin forever.
        for _ in range(5):
            rows = await self._fetch(
                sql.GET_OR_CREATE_SESSION, uuid4(), name, agent, user_id, metadata or {}
            )
            if rows:
                return _session(rows[0])
        raise StoreUnavailable(f"could not get or create session {name!r}: too much contention")

    async def get_session(self, session_id: UUID) -> Session | None:
        rows = await self._fetch(sql.GET_SESSION, session_id)
        return _session(rows[0]) if rows else None

    async def find_session(self, name: str, user_id: str | None = None) -> Session | None:
        rows = await self._fetch(sql.FIND_SESSION, name, user_id)
        return _session(rows[0]) if rows else None

    async def list_sessions(
        self, *, user_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Session], int]:
        if not user_id:
            rows = await self._fetch(sql.LIST_SESSIONS, limit, offset)
        else:
            rows = await self._fetch(sql.LIST_USER_SESSIONS, limit, offset, user_id)
        return [_session(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def delete_session(self, session_id: UUID) -> bool:
        rows = await self._fetch(sql.DELETE_SESSION, session_id)
        return bool(rows)

    async def list_messages(
        self, session_id: UUID, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[Message], int]:
        rows = await self._fetch(sql.LIST_MESSAGES, session_id, limit, offset)
        return [_message(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def get_run(self, run_id: UUID) -> Run | None:
        rows = await self._fetch(sql.GET_RUN, run_id)
        return _run(rows[0]) if rows else None

    async def seed_history(self, session_id: UUID, rows: list[NewMessage]) -> bool:
        if not rows:
            return True
        ids, roles, contents = (
            [r.id for r in rows],
            [r.role for r in rows],
            [r.content for r in rows],
        )
        return bool(await self._fetch(sql.SEED_HISTORY, session_id, ids, roles, contents))

    async def active_run(self, session_id: UUID) -> Run | None:
        rows = await self._fetch(sql.ACTIVE_RUN, session_id)
        return _run(rows[0]) if rows else None

    async def add_user_message(
        self, session_id: UUID, message: NewMessage, *, start: RunStart | None = None
    ) -> tuple[Message, Turn | None]:
        if message.role != "user":
            raise ValueError(f"add_user_message expects role 'user', got {message.role!r}")
        m = message
        fields = (
            *(m.id, m.role, m.content, m.run_id, m.payload, m.channel_payload, m.options),
            *(m.idempotency_key, m.fingerprint),
        )
        try:
            if start is None:
                rows = await self._fetch(sql.ADD_MESSAGE, session_id, *fields)
                if not rows:
                    raise SessionNotFound(f"session {str(session_id)!r} not found")
                return _message(rows[0]), None
            args = (*_start_args(session_id, start), *fields)
            rows = await self._fetch(sql.ADD_MESSAGE_AND_START, *args)
            if not rows:  # a concurrent writer, or no such session
                rows = await self._fetch(sql.ADD_MESSAGE_AND_START, *args, lock=session_id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != sql.KEY_INDEX or m.idempotency_key is None:
                raise
            # The statement wrote nothing. The violation is reported only once the other
            # insert committed, so the message it stored is visible to our next statement.
            stored = await self.find_message(session_id, m.idempotency_key)
            if stored is None:  # deleted since, with its session
                raise SessionNotFound(f"session {str(session_id)!r} not found") from None
            raise DuplicateMessage(stored) from None
        if not rows:
            raise SessionNotFound(f"session {str(session_id)!r} not found")
        inserted, turn = _turn(rows)
        assert inserted is not None
        return inserted, turn

    async def find_message(self, session_id: UUID, idempotency_key: str) -> Message | None:
        rows = await self._fetch(sql.FIND_MESSAGE, session_id, idempotency_key)
        return _message(rows[0]) if rows else None

    async def start_run(self, session_id: UUID, start: RunStart) -> Turn | None:
        if start.upto_seq is None:
            raise ValueError("start_run needs an explicit upto_seq")
        args = _start_args(session_id, start)
        rows = await self._fetch(sql.START_RUN, *args)
        if rows and rows[0]["r_id"] is None:  # a prompt exists but a concurrent writer won
            rows = await self._fetch(sql.START_RUN, *args, lock=session_id)
        return _turn(rows)[1]

    async def commit_run(self, session_id: UUID, run_id: UUID, reply: Reply) -> Message | None:
        m = reply.message
        fields = (m.id, m.role, m.content, m.payload, m.channel_payload, reply.usage)
        outbox = _delivery_columns(reply.deliveries)
        rows = await self._fetch(sql.COMMIT_RUN, session_id, run_id, *fields, *outbox)
        return _message(rows[0]) if rows else None

    async def finish_run(
        self,
        session_id: UUID,
        run_id: UUID,
        status: EndStatus,
        *,
        error: RunError | None = None,
        superseded_by: UUID | None = None,
        side_effects: list[NewMessage] | None = None,
        deliveries: list[NewDelivery] | None = None,
    ) -> Run | None:
        rows = side_effects or []
        columns = (
            [r.id for r in rows],
            [r.role for r in rows],
            [r.content for r in rows],
            [r.payload for r in rows],
            # jsonb[] would need the codec per element; text[] cast in SQL is simpler.
            [None if r.channel_payload is None else json.dumps(r.channel_payload) for r in rows],
        )
        rows_ = await self._fetch(
            sql.FINISH_RUN,
            session_id,
            run_id,
            status,
            None if error is None else error.message,
            superseded_by,
            *columns,
            None if error is None else error.code,
            closes_messages(status, error),
            *_delivery_columns(deliveries or ()),
        )
        return _run(rows_[0]) if rows_ else None

    async def answer_for(self, message_id: UUID) -> tuple[Run, Message | None] | None:
        rows = await self._fetch(sql.ANSWER_FOR, message_id)
        if not rows:
            return None
        row = rows[0]
        return _run(row, prefix="r_"), (_message(row) if row["id"] is not None else None)

    async def unanswered(self, session_id: UUID) -> list[Message]:
        return [_message(r) for r in await self._fetch(sql.UNANSWERED, session_id)]

    async def get_message(self, message_id: UUID) -> Message | None:
        rows = await self._fetch(sql.GET_MESSAGE, message_id)
        return _message(rows[0]) if rows else None

    async def sessions_with_unanswered(self, limit: int) -> list[UUID]:
        return [r["id"] for r in await self._fetch(sql.SESSIONS_WITH_UNANSWERED, limit)]

    async def list_runs(
        self, session_id: UUID, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Run], int]:
        rows = await self._fetch(sql.LIST_RUNS, session_id, limit, offset)
        return [_run(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def claim_deliveries(self, owner: str, limit: int, lease_s: float) -> list[Delivery]:
        rows = await self._fetch(sql.CLAIM_DELIVERIES, owner, limit, lease_s)
        return sorted((_delivery(r) for r in rows), key=lambda d: d.next_attempt_at)

    async def settle_delivery(self, delivery_id: UUID, owner: str, attempt: Attempt) -> bool:
        a = attempt
        rows = await self._fetch(
            sql.SETTLE_DELIVERY,
            delivery_id,
            owner,
            a.delivered,
            a.status_code,
            a.error,
            a.retry_in_s,
            a.max_age_s,
        )
        return bool(rows)

    async def get_delivery(self, delivery_id: UUID) -> Delivery | None:
        rows = await self._fetch(sql.GET_DELIVERY, delivery_id)
        return _delivery(rows[0]) if rows else None

    async def list_deliveries(
        self,
        *,
        status: DeliveryStatus | None = None,
        owner: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Delivery], int]:
        rows = await self._fetch(sql.LIST_DELIVERIES, limit, offset, status, owner)
        return [_delivery(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def redeliver(self, delivery_id: UUID) -> Delivery | None:
        rows = await self._fetch(sql.REDELIVER, delivery_id)
        return _delivery(rows[0]) if rows else None

    async def _fetch(self, query: str, *args: Any, lock: UUID | None = None) -> list[Any]:
        """Run one statement; with ``lock``, first lock that session row in a transaction so
        the statement's snapshot follows every writer (the slow path in the module docstring)."""
        if self._closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        try:
            if lock is None:
                return list(await self._pool.fetch(query, *args))
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(sql.LOCK_SESSION, lock)
                return list(await conn.fetch(query, *args))
        except _UNAVAILABLE as exc:
            if isinstance(exc, _MISUSE):
                raise
            if isinstance(exc, _BROKEN):
                # The server went away (restart, failover): every pooled connection is
                # suspect. Expired ones are replaced as they come back to the pool, so the
                # first request after recovery does not meet a dead connection.
                await self._pool.expire_connections()
            raise StoreUnavailable(f"PostgreSQL is unavailable: {exc}") from exc


async def _keep_session(conn: Any) -> None:
    """Pool ``reset`` hook that does nothing, on purpose.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; CLOSE ALL; pg_advisory_unlock_all()``
    on every release: one more round-trip per statement. The store keeps no session state
    (no SET, LISTEN, cursors or advisory locks on pooled connections; migrations lock on their
    own connection) and asyncpg still rolls back any open transaction before this hook runs.
    """


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _start_args(session_id: UUID, s: RunStart) -> tuple[Any, ...]:
    return (session_id, s.run_id, s.agent, s.model, s.history_limit, s.upto_seq)


def _turn(rows: Sequence[Any]) -> tuple[Message | None, Turn | None]:
    """Split the tagged rows of a run-opening statement into the new message and the turn."""
    inserted: Message | None = None
    prompt: list[Message] = []
    history: list[Message] = []
    run: Run | None = None
    for row in rows:
        kind = row["kind"]
        if kind == "message":
            inserted = _message(row)
        elif kind == "prompt":
            prompt.append(_message(row))
        else:
            history.append(_message(row))
        if run is None and row["r_id"] is not None:
            run = _run(row, prefix="r_")
    return inserted, (Turn(run=run, history=history, prompt=prompt) if run else None)


def _delivery_columns(deliveries: Sequence[NewDelivery]) -> tuple[list[Any], ...]:
    return (
        [d.id for d in deliveries],
        [d.url for d in deliveries],
        [d.body for d in deliveries],
    )


def _delivery(row: Any) -> Delivery:
    return Delivery(*(row[c] for c in sql.DELIVERY.split(", ")))


def _session(row: Any) -> Session:
    return Session(*(row[c] for c in sql.SESSION.split(", ")))


def _message(row: Any) -> Message:
    return Message(*(row[c] for c in sql.MSG.split(", ")))


def _run(row: Any, prefix: str = "") -> Run:
    values = {c: row[prefix + c] for c in sql.RUN.split(", ")}
    values["message_ids"] = tuple(values["message_ids"])
    return Run(**values)
