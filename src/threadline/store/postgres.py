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
snapshot holds every message. When the guard fails nothing is written and the statement is rerun
in a transaction after ``SELECT ... FOR UPDATE`` on the session, whose later snapshot is
complete. That slow path runs only when writers collide on one session.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import asyncpg

from threadline.errors import InvalidRequest, SessionNotFound, StoreUnavailable
from threadline.store.base import Message, NewMessage, Reply, Run, RunStart, Session, Turn
from threadline.store.migrations import migrate_postgres

QueryLogger = Callable[[Any], object]

_MSG = "id, session_id, seq, role, content, run_id, payload, channel_payload, created_at"
_SESSION = "id, name, agent, user_id, metadata, created_at, updated_at"
_RUN = (
    "id, session_id, agent, status, message_ids, upto_seq, reply_message_id, superseded_by,"
    " error, model, usage, created_at, started_at, finished_at"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, session_id, seq, role, content, run_id, payload, channel_payload)"
)
# Every row of a run-opening statement carries the run's columns, prefixed with r_.
_TAGGED = (
    ", ".join(f"x.{c}" for c in _MSG.split(", "))
    + ", "
    + ", ".join(f"r.{c} AS r_{c}" for c in _RUN.split(", "))
)

# Parameters shared by both run-opening statements: $1 session, $2 run id, $3 agent, $4 model,
# $5 history_limit, $6 upto_seq. `snap` reads the counters the guard compares; `earlier` the
# snapshot's unanswered user messages up to upto_seq. `r` opens the run over `prompt`; `history`
# is the newest history_limit rows that are not unanswered user messages (those are this prompt
# or a later one), re-sorted by the final ORDER BY.
_EARLIER = f"""
earlier AS (
    SELECT {_MSG} FROM messages
    WHERE session_id = $1::uuid AND role = 'user'
      AND seq > (SELECT answered_seq FROM snap) AND seq <= (SELECT upto FROM snap)
)"""
_OPEN_RUN = f"""
r AS (
    INSERT INTO runs (id, session_id, agent, status, message_ids, upto_seq, model, started_at)
    SELECT $2::uuid, $1::uuid, $3::text, 'running', array_agg(p.id ORDER BY p.seq), max(p.seq),
           $4::text, now()
    FROM prompt p HAVING count(*) > 0
    RETURNING {_RUN}
),
history AS (
    SELECT * FROM (
        SELECT {_MSG} FROM messages
        WHERE session_id = $1::uuid AND EXISTS (SELECT 1 FROM r)
          AND NOT (role = 'user' AND seq > (SELECT answered_seq FROM snap))
        ORDER BY seq DESC LIMIT $5::bigint
    ) newest
)"""

# Hot path, round-trip 1. Extra parameters: $7.. $12 the message. The new row is invisible to
# the statement's own snapshot, so `prompt` unions it in from the INSERT's RETURNING.
_ADD_MESSAGE_AND_START = f"""
WITH snap AS (
    SELECT last_seq, answered_seq, COALESCE($6::bigint, last_seq + 1) AS upto
    FROM sessions WHERE id = $1::uuid
),{_EARLIER},
s AS (
    UPDATE sessions
    SET last_seq = sessions.last_seq + 1, updated_at = now(),
        current_run_id = CASE WHEN snap.upto > snap.last_seq OR EXISTS (SELECT 1 FROM earlier)
                         THEN $2::uuid ELSE sessions.current_run_id END
    FROM snap
    WHERE sessions.id = $1::uuid
      AND sessions.last_seq = snap.last_seq AND sessions.answered_seq = snap.answered_seq
    RETURNING sessions.last_seq AS seq, snap.upto
),
m AS (
    {_INSERT_MESSAGE}
    SELECT $7::uuid, $1::uuid, s.seq, $8::text, $9::text, $10::uuid, $11::bytea, $12::jsonb FROM s
    RETURNING {_MSG}
),
prompt AS (
    SELECT * FROM earlier WHERE EXISTS (SELECT 1 FROM s)
    UNION ALL
    SELECT m.* FROM m, s WHERE m.seq <= s.upto
),{_OPEN_RUN}
SELECT x.kind, {_TAGGED}
FROM (
    SELECT 'message' AS kind, m.* FROM m
    UNION ALL SELECT 'prompt', prompt.* FROM prompt
    UNION ALL SELECT 'history', history.* FROM history
) x LEFT JOIN r ON true
ORDER BY x.seq
"""

# Returns the snapshot's prompt rows even when the guard fails, so that "prompt rows but no
# run" tells a lost race (rerun under lock) from "nothing to answer" (no rows).
_START_RUN = f"""
WITH snap AS (
    SELECT last_seq, answered_seq, $6::bigint AS upto FROM sessions WHERE id = $1::uuid
),{_EARLIER},
s AS (
    UPDATE sessions SET current_run_id = $2::uuid
    FROM snap
    WHERE sessions.id = $1::uuid
      AND sessions.last_seq = snap.last_seq AND sessions.answered_seq = snap.answered_seq
      AND EXISTS (SELECT 1 FROM earlier)
    RETURNING sessions.id
),
prompt AS (SELECT * FROM earlier WHERE EXISTS (SELECT 1 FROM s)),{_OPEN_RUN}
SELECT x.kind, {_TAGGED}
FROM (
    SELECT 'prompt' AS kind, earlier.* FROM earlier
    UNION ALL SELECT 'history', history.* FROM history
) x LEFT JOIN r ON true
ORDER BY x.seq
"""

# Hot path, round-trip 2. The fence is the session UPDATE's WHERE: the row lock makes it see
# the latest current_run_id, and every other part only runs on the row it returns.
_COMMIT_RUN = f"""
WITH s AS (
    UPDATE sessions
    SET last_seq = last_seq + 1, updated_at = now(), current_run_id = NULL,
        answered_seq = GREATEST(answered_seq, (SELECT upto_seq FROM runs WHERE id = $2::uuid))
    WHERE id = $1::uuid AND current_run_id = $2::uuid
    RETURNING last_seq
),
m AS (
    {_INSERT_MESSAGE}
    SELECT $3::uuid, $1::uuid, s.last_seq, $4::text, $5::text, $2::uuid, $6::bytea, $7::jsonb
    FROM s
    RETURNING {_MSG}
),
r AS (
    UPDATE runs
    SET status = 'succeeded', reply_message_id = m.id, usage = $8::jsonb, finished_at = now()
    FROM m WHERE runs.id = $2::uuid
)
SELECT {_MSG} FROM m
"""

# Only an unfinished run can be finished; its side effects take the next seqs.
_FINISH_RUN = f"""
WITH target AS (
    SELECT id FROM runs
    WHERE id = $2::uuid AND session_id = $1::uuid AND status IN ('queued', 'running')
),
s AS (
    UPDATE sessions
    SET last_seq = last_seq + cardinality($6::uuid[]), updated_at = now(),
        current_run_id = CASE WHEN current_run_id = $2::uuid THEN NULL ELSE current_run_id END
    WHERE id = $1::uuid AND EXISTS (SELECT 1 FROM target)
    RETURNING last_seq - cardinality($6::uuid[]) AS base
),
m AS (
    {_INSERT_MESSAGE}
    SELECT e.id, $1::uuid, s.base + e.ord, e.role, e.content, $2::uuid, e.payload, e.channel::jsonb
    FROM s, unnest($6::uuid[], $7::text[], $8::text[], $9::bytea[], $10::text[])
         WITH ORDINALITY AS e (id, role, content, payload, channel, ord)
)
UPDATE runs SET status = $3::text, error = $4::text, superseded_by = $5::uuid, finished_at = now()
WHERE id IN (SELECT id FROM target)
"""

_ADD_MESSAGE = f"""
WITH s AS (
    UPDATE sessions SET last_seq = last_seq + 1, updated_at = now()
    WHERE id = $1::uuid RETURNING last_seq
)
{_INSERT_MESSAGE}
SELECT $2::uuid, $1::uuid, s.last_seq, $3::text, $4::text, $5::uuid, $6::bytea, $7::jsonb FROM s
RETURNING {_MSG}
"""

_CREATE_SESSION = f"""
INSERT INTO sessions (id, name, agent, user_id, metadata) VALUES ($1, $2, $3, $4, $5)
RETURNING {_SESSION}
"""
# Exactly one branch returns a row: the insert's (invisible to the second branch's snapshot)
# or the existing one's. Neither, if the winner committed after our snapshot: the caller reruns.
_GET_OR_CREATE_SESSION = f"""
WITH ins AS (
    INSERT INTO sessions (id, name, agent, user_id, metadata)
    VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::jsonb)
    ON CONFLICT DO NOTHING
    RETURNING {_SESSION}
)
SELECT * FROM ins
UNION ALL
SELECT {_SESSION} FROM sessions
WHERE COALESCE(user_id, '') = COALESCE($4::text, '') AND name = $2::text
"""
_GET_SESSION = f"SELECT {_SESSION} FROM sessions WHERE id = $1"
_FIND_SESSION = f"""
SELECT {_SESSION} FROM sessions
WHERE COALESCE(user_id, '') = COALESCE($2::text, '') AND name = $1::text
"""
# One row at least, carrying the total, even when the page is past the end.
_LIST_SESSIONS_TEMPLATE = f"""
WITH page AS (
    SELECT {_SESSION} FROM sessions {{where}}
    ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM sessions {{where}}) t LEFT JOIN page ON true
ORDER BY page.created_at DESC, page.id DESC
"""
_LIST_SESSIONS = _LIST_SESSIONS_TEMPLATE.format(where="")
_LIST_USER_SESSIONS = _LIST_SESSIONS_TEMPLATE.format(where="WHERE user_id = $3")
_LIST_MESSAGES = f"""
WITH page AS (
    SELECT {_MSG} FROM messages WHERE session_id = $1 ORDER BY seq LIMIT $2 OFFSET $3
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM messages WHERE session_id = $1) t LEFT JOIN page ON true
ORDER BY page.seq
"""
_UNANSWERED = f"""
SELECT {", ".join(f"m.{c}" for c in _MSG.split(", "))}
FROM messages m JOIN sessions s ON s.id = m.session_id
WHERE m.session_id = $1 AND m.role = 'user' AND m.seq > s.answered_seq
ORDER BY m.seq
"""
_GET_RUN = f"SELECT {_RUN} FROM runs WHERE id = $1"


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


class PostgresStore:
    """The ``Store`` on PostgreSQL. Build it with ``await PostgresStore.connect(url)``."""

    backend: Literal["sqlite", "postgres"] = "postgres"

    def __init__(self, pool: Any, url: str, *, connect_timeout: float = 10.0) -> None:
        self._pool = pool
        self._url = url
        self._connect_timeout = connect_timeout
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        connect_timeout: float = 10.0,
        query_logger: QueryLogger | None = None,
    ) -> PostgresStore:
        """Open the pool. ``query_logger`` is added to every connection (tests count queries)."""

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
                init=init,
                reset=_keep_session,
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {_redact(url)!r}: {exc}"
            ) from exc
        return cls(pool, url, connect_timeout=connect_timeout)

    @property
    def pool(self) -> Any:
        return self._pool

    async def migrate(self) -> list[int]:
        """Apply pending migrations (on a dedicated connection); return the versions applied."""
        return await migrate_postgres(self._url, connect_timeout=self._connect_timeout)

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
            rows = await self._fetch(_CREATE_SESSION, uuid4(), name, agent, user_id, metadata or {})
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
                _GET_OR_CREATE_SESSION, uuid4(), name, agent, user_id, metadata or {}
            )
            if rows:
                return _session(rows[0])
        raise StoreUnavailable(f"could not get or create session {name!r}: too much contention")

    async def get_session(self, session_id: UUID) -> Session | None:
        rows = await self._fetch(_GET_SESSION, session_id)
        return _session(rows[0]) if rows else None

    async def find_session(self, name: str, user_id: str | None = None) -> Session | None:
        rows = await self._fetch(_FIND_SESSION, name, user_id)
        return _session(rows[0]) if rows else None

    async def list_sessions(
        self, *, user_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Session], int]:
        if user_id is None:
            rows = await self._fetch(_LIST_SESSIONS, limit, offset)
        else:
            rows = await self._fetch(_LIST_USER_SESSIONS, limit, offset, user_id)
        return [_session(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def delete_session(self, session_id: UUID) -> bool:
        rows = await self._fetch("DELETE FROM sessions WHERE id = $1 RETURNING id", session_id)
        return bool(rows)

    async def list_messages(
        self, session_id: UUID, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[Message], int]:
        rows = await self._fetch(_LIST_MESSAGES, session_id, limit, offset)
        return [_message(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def get_run(self, run_id: UUID) -> Run | None:
        rows = await self._fetch(_GET_RUN, run_id)
        return _run(rows[0]) if rows else None

    async def add_user_message(
        self, session_id: UUID, message: NewMessage, *, start: RunStart | None = None
    ) -> tuple[Message, Turn | None]:
        if message.role != "user":
            raise ValueError(f"add_user_message expects role 'user', got {message.role!r}")
        m = message
        fields = (m.id, m.role, m.content, m.run_id, m.payload, m.channel_payload)
        if start is None:
            rows = await self._fetch(_ADD_MESSAGE, session_id, *fields)
            if not rows:
                raise SessionNotFound(f"session {str(session_id)!r} not found")
            return _message(rows[0]), None
        args = (*_start_args(session_id, start), *fields)
        rows = await self._fetch(_ADD_MESSAGE_AND_START, *args)
        if not rows:  # a concurrent writer, or no such session
            rows = await self._fetch(_ADD_MESSAGE_AND_START, *args, lock=session_id)
        if not rows:
            raise SessionNotFound(f"session {str(session_id)!r} not found")
        inserted, turn = _turn(rows)
        assert inserted is not None
        return inserted, turn

    async def start_run(self, session_id: UUID, start: RunStart) -> Turn | None:
        if start.upto_seq is None:
            raise ValueError("start_run needs an explicit upto_seq")
        args = _start_args(session_id, start)
        rows = await self._fetch(_START_RUN, *args)
        if rows and rows[0]["r_id"] is None:  # a prompt exists but a concurrent writer won
            rows = await self._fetch(_START_RUN, *args, lock=session_id)
        return _turn(rows)[1]

    async def commit_run(self, session_id: UUID, run_id: UUID, reply: Reply) -> Message | None:
        m = reply.message
        fields = (m.id, m.role, m.content, m.payload, m.channel_payload, reply.usage)
        rows = await self._fetch(_COMMIT_RUN, session_id, run_id, *fields)
        return _message(rows[0]) if rows else None

    async def finish_run(
        self,
        session_id: UUID,
        run_id: UUID,
        status: Literal["failed", "superseded"],
        *,
        error: str | None = None,
        superseded_by: UUID | None = None,
        side_effects: list[NewMessage] | None = None,
    ) -> None:
        rows = side_effects or []
        columns = (
            [r.id for r in rows],
            [r.role for r in rows],
            [r.content for r in rows],
            [r.payload for r in rows],
            # jsonb[] would need the codec per element; text[] cast in SQL is simpler.
            [None if r.channel_payload is None else json.dumps(r.channel_payload) for r in rows],
        )
        await self._fetch(_FINISH_RUN, session_id, run_id, status, error, superseded_by, *columns)

    async def unanswered(self, session_id: UUID) -> list[Message]:
        return [_message(r) for r in await self._fetch(_UNANSWERED, session_id)]

    async def _fetch(self, query: str, *args: Any, lock: UUID | None = None) -> list[Any]:
        """Run one statement; with ``lock``, first lock that session row in a transaction so
        the statement's snapshot follows every writer (the slow path in the module docstring)."""
        if self._closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        try:
            if lock is None:
                return list(await self._pool.fetch(query, *args))
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", lock)
                return list(await conn.fetch(query, *args))
        except _UNAVAILABLE as exc:
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


def _session(row: Any) -> Session:
    return Session(*(row[c] for c in _SESSION.split(", ")))


def _message(row: Any) -> Message:
    return Message(*(row[c] for c in _MSG.split(", ")))


def _run(row: Any, prefix: str = "") -> Run:
    values = {c: row[prefix + c] for c in _RUN.split(", ")}
    values["message_ids"] = tuple(values["message_ids"])
    return Run(**values)
