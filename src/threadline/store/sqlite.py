"""``SQLiteStore``: the ``Store`` on one aiosqlite connection.

SQLite has a single writer, and threadline serves SQLite from one process, so one connection is
enough and nothing can interleave with a write. Every method is one plain function run in
aiosqlite's worker thread inside ``BEGIN IMMEDIATE ... COMMIT``: one hop per call, the same
budget a PostgreSQL statement gets, and atomic without any snapshot subtleties.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar
from uuid import UUID, uuid4

import aiosqlite

from threadline.errors import InvalidRequest, SessionNotFound, StoreUnavailable
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
from threadline.store.migrations import apply_sqlite, load_migrations

T = TypeVar("T")
R = TypeVar("R", Session, Message, Run, Delivery)

_MSG = (
    "id, session_id, seq, role, content, run_id, payload, channel_payload, created_at, options,"
    " idempotency_key, fingerprint"
)
_SESSION = "id, name, agent, user_id, metadata, created_at, updated_at"
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({_MSG}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_MSG}"
)
_BY_NAME = "COALESCE(user_id, '') = COALESCE(?, '') AND name = ?"
# Primary result codes meaning "the database cannot serve now", not "this statement is wrong":
# BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL.
_UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15})
# aiosqlite's messages (it raises bare ValueErrors) once its connection is gone.
_AIOSQLITE_CLOSED = frozenset({"Connection closed", "no active connection"})


class SQLiteStore:
    """The ``Store`` on SQLite. Build it with ``await SQLiteStore.connect(url_or_path)``."""

    backend: Literal["sqlite", "postgres"] = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._closed = False

    @classmethod
    async def connect(cls, database: str) -> SQLiteStore:
        """Open ``sqlite:///path``, a plain path, or ``:memory:``."""
        path = database.removeprefix("sqlite://")
        if path != database:
            path = path.removeprefix("/")  # sqlite:///rel -> rel, sqlite:////abs -> /abs
        # Probe first: when aiosqlite fails to open, its worker thread later reports to a loop
        # that may be gone by then ("Event loop is closed" in a thread).
        try:
            await asyncio.to_thread(_probe, path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {path!r}: {exc}") from exc
        # isolation_level=None: the sqlite3 module must not open transactions behind our back.
        conn = aiosqlite.connect(path, isolation_level=None)
        try:
            await conn
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {path!r}: {exc}") from exc
        store = cls(conn)
        try:
            await store._run(_configure, transaction=False)
        except BaseException:
            await conn.close()
            raise
        return store

    async def migrate(self) -> list[int]:
        """Apply pending migrations in one transaction; return the versions applied."""
        migrations = await asyncio.to_thread(load_migrations, "sqlite")
        return await self._run(apply_sqlite, migrations, transaction=False)

    async def aclose(self) -> None:
        self._closed = True
        await self._conn.close()

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchall(), transaction=False)

    async def create_session(
        self,
        agent: str,
        *,
        name: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        try:
            return await self._run(_insert_session, uuid4(), name, agent, user_id, metadata)
        except sqlite3.IntegrityError:
            raise InvalidRequest(
                f"session name {name!r} is already taken for user {user_id!r}"
            ) from None

    async def get_or_create_session(
        self,
        name: str,
        *,
        agent: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        def get_or_create(db: sqlite3.Connection) -> Session:
            found = _find_session(db, name, user_id)
            return found or _insert_session(db, uuid4(), name, agent, user_id, metadata)

        return await self._run(get_or_create)

    async def get_session(self, session_id: UUID) -> Session | None:
        def get(db: sqlite3.Connection) -> Session | None:
            row = db.execute(
                f"SELECT {_SESSION} FROM sessions WHERE id = ?", (str(session_id),)
            ).fetchone()
            return _session(row) if row else None

        return await self._run(get)

    async def find_session(self, name: str, user_id: str | None = None) -> Session | None:
        return await self._run(_find_session, name, user_id)

    async def list_sessions(
        self, *, user_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Session], int]:
        where, args = (
            ("WHERE user_id = ?", (user_id,))
            if user_id
            else ("WHERE COALESCE(user_id, '') = ''", ())
        )

        def page(db: sqlite3.Connection) -> tuple[list[Session], int]:
            total = db.execute(f"SELECT count(*) FROM sessions {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT {_SESSION} FROM sessions {where} "
                "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            )
            return [_session(r) for r in rows], total

        return await self._run(page)

    async def delete_session(self, session_id: UUID) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM sessions WHERE id = ?", (str(session_id),)).rowcount > 0

        return await self._run(delete)

    async def list_messages(
        self, session_id: UUID, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[Message], int]:
        def page(db: sqlite3.Connection) -> tuple[list[Message], int]:
            sid = str(session_id)
            total = db.execute(
                "SELECT count(*) FROM messages WHERE session_id = ?", (sid,)
            ).fetchone()[0]
            rows = db.execute(
                f"SELECT {_MSG} FROM messages WHERE session_id = ? ORDER BY seq LIMIT ? OFFSET ?",
                (sid, limit, offset),
            )
            return [_message(r) for r in rows], total

        return await self._run(page)

    async def get_run(self, run_id: UUID) -> Run | None:
        return await self._run(_get_run, run_id, transaction=False)

    async def seed_history(self, session_id: UUID, rows: list[NewMessage]) -> bool:
        def seed(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT last_seq FROM sessions WHERE id = ?", (str(session_id),)
            ).fetchone()
            if row is None:
                raise SessionNotFound(f"session {str(session_id)!r} not found")
            if row[0] != 0:
                return False
            _insert_messages(db, session_id, rows, run_id=None)
            db.execute(
                "UPDATE sessions SET answered_seq = last_seq WHERE id = ?", (str(session_id),)
            )
            return True

        if not rows:
            return True
        return await self._run(seed)

    async def active_run(self, session_id: UUID) -> Run | None:
        return await self._run(_active_run, session_id, transaction=False)

    async def add_user_message(
        self, session_id: UUID, message: NewMessage, *, start: RunStart | None = None
    ) -> tuple[Message, Turn | None]:
        if message.role != "user":
            raise ValueError(f"add_user_message expects role 'user', got {message.role!r}")

        def add(db: sqlite3.Connection) -> tuple[Message, Turn | None]:
            if message.idempotency_key is not None:
                # Under BEGIN IMMEDIATE nothing else writes between this look and the insert;
                # the unique index only backs it up.
                stored = _find_message(db, session_id, message.idempotency_key)
                if stored is not None:
                    raise DuplicateMessage(stored)
            (inserted,) = _insert_messages(db, session_id, [message], run_id=message.run_id)
            if start is None:
                return inserted, None
            upto = inserted.seq if start.upto_seq is None else start.upto_seq
            return inserted, _open_run(db, session_id, start, upto)

        return await self._run(add)

    async def find_message(self, session_id: UUID, idempotency_key: str) -> Message | None:
        return await self._run(_find_message, session_id, idempotency_key, transaction=False)

    async def start_run(self, session_id: UUID, start: RunStart) -> Turn | None:
        if start.upto_seq is None:
            raise ValueError("start_run needs an explicit upto_seq")
        return await self._run(_open_run, session_id, start, start.upto_seq)

    async def commit_run(self, session_id: UUID, run_id: UUID, reply: Reply) -> Message | None:
        def commit(db: sqlite3.Connection) -> Message | None:
            fenced = db.execute(
                "SELECT 1 FROM sessions WHERE id = ? AND current_run_id = ?",
                (str(session_id), str(run_id)),
            ).fetchone()
            if fenced is None:
                return None
            (stored,) = _insert_messages(db, session_id, [reply.message], run_id=run_id)
            now = _now()
            db.execute(
                "UPDATE sessions SET current_run_id = NULL, answered_seq = max(answered_seq,"
                " (SELECT upto_seq FROM runs WHERE id = ?)) WHERE id = ?",
                (str(run_id), str(session_id)),
            )
            db.execute(
                "UPDATE runs SET status = 'succeeded', reply_message_id = ?, usage = ?,"
                " finished_at = ? WHERE id = ?",
                (str(stored.id), json.dumps(reply.usage), now, str(run_id)),
            )
            _insert_deliveries(db, session_id, run_id, reply.deliveries)
            return stored

        return await self._run(commit)

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
        def finish(db: sqlite3.Connection) -> Run | None:
            rid, sid = str(run_id), str(session_id)
            unfinished = db.execute(
                "SELECT upto_seq FROM runs WHERE id = ? AND session_id = ?"
                " AND status IN ('queued', 'running')",
                (rid, sid),
            ).fetchone()
            if unfinished is None:
                return None
            _insert_messages(db, session_id, side_effects or [], run_id=run_id)
            if closes_messages(status, error):
                # Answered by failure or cancel: never prompted again (see Store.finish_run).
                db.execute(
                    "UPDATE sessions SET answered_seq = max(answered_seq, ?)"
                    " WHERE id = ? AND current_run_id = ?",
                    (unfinished[0], sid, rid),
                )
                _insert_deliveries(db, session_id, run_id, deliveries or ())
            db.execute(
                "UPDATE sessions SET current_run_id = NULL WHERE id = ? AND current_run_id = ?",
                (sid, rid),
            )
            db.execute(
                "UPDATE runs SET status = ?, error = ?, error_code = ?, superseded_by = ?,"
                " finished_at = ? WHERE id = ?",
                (
                    status,
                    None if error is None else error.message,
                    None if error is None else error.code,
                    None if superseded_by is None else str(superseded_by),
                    _now(),
                    rid,
                ),
            )
            return _get_run(db, run_id)

        return await self._run(finish)

    async def answer_for(self, message_id: UUID) -> tuple[Run, Message | None] | None:
        return await self._run(_answer_for, message_id, transaction=False)

    async def unanswered(self, session_id: UUID) -> list[Message]:
        return await self._run(_unanswered, session_id, None, transaction=False)

    async def get_message(self, message_id: UUID) -> Message | None:
        def get(db: sqlite3.Connection) -> Message | None:
            row = db.execute(
                f"SELECT {_MSG} FROM messages WHERE id = ?", (str(message_id),)
            ).fetchone()
            return _message(row) if row else None

        return await self._run(get, transaction=False)

    async def sessions_with_unanswered(self, limit: int) -> list[UUID]:
        def find(db: sqlite3.Connection) -> list[UUID]:
            rows = db.execute(
                "SELECT s.id FROM sessions s WHERE s.last_seq > s.answered_seq"
                " AND EXISTS (SELECT 1 FROM messages m WHERE m.session_id = s.id"
                " AND m.role = 'user' AND m.seq > s.answered_seq) LIMIT ?",
                (limit,),
            )
            return [UUID(r[0]) for r in rows]

        return await self._run(find, transaction=False)

    async def list_runs(
        self, session_id: UUID, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Run], int]:
        def page(db: sqlite3.Connection) -> tuple[list[Run], int]:
            sid = str(session_id)
            total = db.execute("SELECT count(*) FROM runs WHERE session_id = ?", (sid,))
            rows = db.execute(
                "SELECT * FROM runs WHERE session_id = ?"
                " ORDER BY created_at, started_at, rowid LIMIT ? OFFSET ?",
                (sid, limit, offset),
            )
            return [_record(Run, r) for r in rows], total.fetchone()[0]

        return await self._run(page)

    # -- the webhook outbox (see PostgresStore for the rules) ----------------------------

    async def claim_deliveries(self, owner: str, limit: int, lease_s: float) -> list[Delivery]:
        def claim(db: sqlite3.Connection) -> list[Delivery]:
            now = dt.datetime.now(dt.UTC)
            rows = db.execute(
                "UPDATE deliveries SET status = 'delivering', attempts = attempts + 1,"
                " lease_owner = ?, lease_expires_at = ?"
                " WHERE id IN (SELECT id FROM deliveries"
                "  WHERE (status = 'pending' AND next_attempt_at <= ?)"
                "   OR (status = 'delivering' AND lease_expires_at < ?)"
                "  ORDER BY next_attempt_at LIMIT ?)"
                " RETURNING *",
                (
                    owner,
                    _stamp(now + dt.timedelta(seconds=lease_s)),
                    _stamp(now),
                    _stamp(now),
                    limit,
                ),
            ).fetchall()
            return sorted((_record(Delivery, r) for r in rows), key=lambda d: d.next_attempt_at)

        return await self._run(claim)

    async def settle_delivery(self, delivery_id: UUID, owner: str, attempt: Attempt) -> bool:
        def settle(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT retry_from FROM deliveries WHERE id = ? AND lease_owner = ?"
                " AND status = 'delivering'",
                (str(delivery_id), owner),
            ).fetchone()
            if row is None:
                return False
            now = dt.datetime.now(dt.UTC)
            due = now + dt.timedelta(seconds=attempt.retry_in_s)
            give_up = dt.datetime.fromisoformat(row[0]) + dt.timedelta(seconds=attempt.max_age_s)
            if attempt.delivered:
                db.execute(
                    "UPDATE deliveries SET status = 'delivered', delivered_at = ?,"
                    " last_status_code = ?, lease_owner = NULL, lease_expires_at = NULL"
                    " WHERE id = ?",
                    (_stamp(now), attempt.status_code, str(delivery_id)),
                )
            else:
                db.execute(
                    "UPDATE deliveries SET status = ?, next_attempt_at = ?, last_status_code = ?,"
                    " last_error = ?, lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
                    (
                        "failed" if due > give_up else "pending",
                        _stamp(due),
                        attempt.status_code,
                        attempt.error,
                        str(delivery_id),
                    ),
                )
            return True

        return await self._run(settle)

    async def get_delivery(self, delivery_id: UUID) -> Delivery | None:
        def get(db: sqlite3.Connection) -> Delivery | None:
            row = db.execute("SELECT * FROM deliveries WHERE id = ?", (str(delivery_id),))
            found = row.fetchone()
            return _record(Delivery, found) if found else None

        return await self._run(get, transaction=False)

    async def list_deliveries(
        self,
        *,
        status: DeliveryStatus | None = None,
        owner: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Delivery], int]:
        where = "WHERE (? IS NULL OR status = ?)"
        where += " AND (? IS NULL OR session_id IN (SELECT id FROM sessions WHERE user_id = ?))"
        args = (status, status, owner, owner)

        def page(db: sqlite3.Connection) -> tuple[list[Delivery], int]:
            total = db.execute(f"SELECT count(*) FROM deliveries {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT * FROM deliveries {where}"
                " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            )
            return [_record(Delivery, r) for r in rows], total

        return await self._run(page)

    async def redeliver(self, delivery_id: UUID) -> Delivery | None:
        def reset(db: sqlite3.Connection) -> Delivery | None:
            now = _now()
            row = db.execute(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, retry_from = ?,"
                " delivered_at = NULL, lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ? RETURNING *",
                (now, now, str(delivery_id)),
            ).fetchone()
            return _record(Delivery, row) if row else None

        return await self._run(reset)

    async def _run(self, fn: Callable[..., T], *args: Any, transaction: bool = True) -> T:
        """Run ``fn(db, *args)`` in aiosqlite's worker thread: exactly one hop.

        aiosqlite has no public way to run several statements as one unit of work in its
        thread, and awaiting BEGIN / each statement / COMMIT separately would cost a hop each
        and let other calls interleave. ``Connection._execute`` queues a callable onto that
        thread; it is the one private aiosqlite API we use, and only here.
        """
        if self._closed:
            raise StoreUnavailable("the SQLite store is closed")
        try:
            result: T = await self._conn._execute(  # type: ignore[no-untyped-call]
                _call, self._conn, fn, args, transaction
            )
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _UNAVAILABLE_CODES:
                raise StoreUnavailable(f"SQLite is unavailable: {exc}") from exc
            raise
        except ValueError as exc:
            # aiosqlite's worker stopped under us (the connection was closed): its
            # equivalent of asyncpg's "connection is closed". Other ValueErrors are faults.
            if str(exc) in _AIOSQLITE_CLOSED:
                raise StoreUnavailable(f"SQLite is unavailable: {exc}") from exc
            raise
        return result


def _call(conn: aiosqlite.Connection, fn: Callable[..., T], args: Any, transaction: bool) -> T:
    db = conn._conn  # the sqlite3 connection; we are on the thread that owns it
    if not transaction:
        return fn(db, *args)
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db, *args)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _probe(path: str) -> None:
    sqlite3.connect(path).close()


def _configure(db: sqlite3.Connection) -> None:
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA foreign_keys = ON")
    # WAL with synchronous=NORMAL stays consistent after a crash; it may lose the last commits
    # on power loss, which a chat server can afford in exchange for not fsyncing every turn.
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA busy_timeout = 5000")  # `threadline migrate` may hold the file briefly


def _now() -> str:
    return _stamp(dt.datetime.now(dt.UTC))


def _stamp(moment: dt.datetime) -> str:
    # Fixed width, always UTC: text order is time order.
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _insert_session(
    db: sqlite3.Connection,
    session_id: UUID,
    name: str | None,
    agent: str,
    user_id: str | None,
    metadata: dict[str, Any] | None,
) -> Session:
    now = _now()
    row = db.execute(
        f"INSERT INTO sessions (id, name, agent, user_id, metadata, created_at, updated_at)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {_SESSION}",
        (str(session_id), name, agent, user_id, json.dumps(metadata or {}), now, now),
    ).fetchone()
    return _session(row)


def _find_session(db: sqlite3.Connection, name: str, user_id: str | None) -> Session | None:
    row = db.execute(
        f"SELECT {_SESSION} FROM sessions WHERE {_BY_NAME}", (user_id, name)
    ).fetchone()
    return _session(row) if row else None


def _insert_messages(
    db: sqlite3.Connection, session_id: UUID, messages: list[NewMessage], *, run_id: UUID | None
) -> list[Message]:
    """Take the next seqs from ``sessions.last_seq`` and insert ``messages`` with them."""
    row = db.execute(
        "UPDATE sessions SET last_seq = last_seq + ?, updated_at = ? WHERE id = ?"
        " RETURNING last_seq",
        (len(messages), _now(), str(session_id)),
    ).fetchone()
    if row is None:
        raise SessionNotFound(f"session {str(session_id)!r} not found")
    first = row[0] - len(messages) + 1
    now = _now()
    stored = []
    for seq, m in enumerate(messages, start=first):
        channel = None if m.channel_payload is None else json.dumps(m.channel_payload)
        options = None if m.options is None else json.dumps(m.options)
        rid = None if run_id is None else str(run_id)
        values = (
            str(m.id),
            str(session_id),
            seq,
            m.role,
            m.content,
            rid,
            m.payload,
            channel,
            now,
            options,
            m.idempotency_key,
            m.fingerprint,
        )
        stored.append(_message(db.execute(_INSERT_MESSAGE, values).fetchone()))
    return stored


def _find_message(db: sqlite3.Connection, session_id: UUID, key: str) -> Message | None:
    row = db.execute(
        f"SELECT {_MSG} FROM messages WHERE session_id = ? AND idempotency_key = ?",
        (str(session_id), key),
    ).fetchone()
    return _message(row) if row else None


def _insert_deliveries(
    db: sqlite3.Connection, session_id: UUID, run_id: UUID, deliveries: Sequence[NewDelivery]
) -> None:
    now = _now()
    db.executemany(
        "INSERT INTO deliveries (id, run_id, session_id, url, body, next_attempt_at, created_at,"
        " retry_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (str(d.id), str(run_id), str(session_id), d.url, d.body, now, now, now)
            for d in deliveries
        ],
    )


def _unanswered(db: sqlite3.Connection, session_id: UUID, upto: int | None) -> list[Message]:
    rows = db.execute(
        f"SELECT {_MSG} FROM messages WHERE session_id = ? AND role = 'user'"
        " AND seq > (SELECT answered_seq FROM sessions WHERE id = ?) AND seq <= ? ORDER BY seq",
        (str(session_id), str(session_id), upto if upto is not None else 2**62),
    )
    return [_message(r) for r in rows]


def _open_run(db: sqlite3.Connection, session_id: UUID, start: RunStart, upto: int) -> Turn | None:
    sid, rid = str(session_id), str(start.run_id)
    prompt = _unanswered(db, session_id, upto)
    if not prompt:
        return None
    now = _now()
    db.execute(
        "INSERT INTO runs (id, session_id, agent, status, message_ids, upto_seq, model,"
        " created_at, started_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
        (
            rid,
            sid,
            start.agent,
            json.dumps([str(m.id) for m in prompt]),
            prompt[-1].seq,
            start.model,
            now,
            now,
        ),
    )
    # Close the run this one fences out, unless it already finished on its own.
    db.execute(
        "UPDATE runs SET status = 'superseded', superseded_by = ?, finished_at = ?"
        " WHERE id = (SELECT current_run_id FROM sessions WHERE id = ?)"
        " AND status IN ('queued', 'running')",
        (rid, now, sid),
    )
    db.execute("UPDATE sessions SET current_run_id = ? WHERE id = ?", (rid, sid))
    # Unanswered user messages are this prompt or a later one, never history.
    history = db.execute(
        f"SELECT {_MSG} FROM messages WHERE session_id = ?"
        " AND NOT (role = 'user' AND seq > (SELECT answered_seq FROM sessions WHERE id = ?))"
        " ORDER BY seq DESC LIMIT ?",
        (sid, sid, start.history_limit),
    ).fetchall()
    run = _get_run(db, start.run_id)
    assert run is not None
    return Turn(run=run, history=[_message(r) for r in reversed(history)], prompt=prompt)


def _answer_for(db: sqlite3.Connection, message_id: UUID) -> tuple[Run, Message | None] | None:
    # A message's runs are among its session's: the runs_session_id index bounds the scan of
    # message_ids arrays without an index on their elements.
    row = db.execute(
        "SELECT runs.* FROM messages m JOIN runs ON runs.session_id = m.session_id"
        " WHERE m.id = ? AND (runs.status IN ('succeeded', 'failed')"
        " OR (runs.status = 'cancelled' AND runs.error_code = 'run_cancelled'))"
        " AND runs.upto_seq >= m.seq"
        " AND EXISTS (SELECT 1 FROM json_each(runs.message_ids) WHERE value = m.id) LIMIT 1",
        (str(message_id),),
    ).fetchone()
    if row is None:
        return None
    run = _record(Run, row)
    if run.reply_message_id is None:
        return run, None  # answered by failure
    reply = db.execute(
        f"SELECT {_MSG} FROM messages WHERE id = ?", (str(run.reply_message_id),)
    ).fetchone()
    return (run, _message(reply)) if reply else None


def _get_run(db: sqlite3.Connection, run_id: UUID) -> Run | None:
    row = db.execute("SELECT * FROM runs WHERE id = ?", (str(run_id),)).fetchone()
    return None if row is None else _record(Run, row)


def _active_run(db: sqlite3.Connection, session_id: UUID) -> Run | None:
    row = db.execute(
        "SELECT runs.* FROM sessions JOIN runs ON runs.id = sessions.current_run_id"
        " WHERE sessions.id = ? AND runs.status IN ('queued', 'running')",
        (str(session_id),),
    ).fetchone()
    return None if row is None else _record(Run, row)


def _session(row: sqlite3.Row) -> Session:
    return _record(Session, row)


def _message(row: sqlite3.Row) -> Message:
    return _record(Message, row)


def _uuids(value: str) -> tuple[UUID, ...]:
    return tuple(UUID(i) for i in json.loads(value))


# How each stored column becomes a record field; NULL is None whatever the column.
_PARSE: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(("id", "session_id", "run_id", "reply_message_id", "superseded_by"), UUID),
    **dict.fromkeys(("metadata", "channel_payload", "usage", "options"), json.loads),
    **dict.fromkeys(
        (
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
            "next_attempt_at",
            "retry_from",
            "delivered_at",
            "lease_expires_at",
        ),
        dt.datetime.fromisoformat,
    ),
    "message_ids": _uuids,
}


def _record(cls: Callable[..., R], row: sqlite3.Row) -> R:
    fields = zip(row.keys(), row, strict=True)  # iterating a Row yields values, not keys
    return cls(**{k: None if v is None else _PARSE.get(k, _same)(v) for k, v in fields})


def _same(value: Any) -> Any:
    return value
