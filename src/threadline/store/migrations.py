"""Plain-SQL migrations: the numbered files under ``sql/<backend>/``, applied once each, in order.

Applied versions are recorded in ``schema_migrations``. Several processes may start at once
(``workers > 1``, or a deploy that runs ``migrate`` next to serving processes), so:

* PostgreSQL: the whole run is one transaction on a dedicated connection that first takes a
  transaction-level ``pg_advisory_xact_lock``; the first process applies, the others wait,
  then find nothing left to do. A transaction-level lock (not a session one) because a
  transaction-mode pooler (PgBouncer) may run each statement outside a transaction on a
  different server connection: a session lock would stay held on one of them. All pending
  files and their ``schema_migrations`` rows commit together, or none do.
* SQLite: the whole run is one ``BEGIN IMMEDIATE`` transaction, which takes the database's
  single write lock up front.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import asyncpg

from threadline.errors import StoreUnavailable

Backend = Literal["sqlite", "postgres"]

# Arbitrary but fixed: every threadline process must agree on it. It spells "thrdline".
ADVISORY_LOCK_KEY = 0x7468_7264_6C69_6E65

_PG_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SQLITE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(backend: Backend) -> list[Migration]:
    """Read ``sql/<backend>/NNN_*.sql`` in version order. Blocking: call it off the event loop."""
    folder = resources.files("threadline.store").joinpath("sql", backend)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        prefix = entry.name.partition("_")[0]
        if not prefix.isdigit():
            raise ValueError(f"migration {entry.name!r} does not start with a version number")
        version = int(prefix)
        if version in found:
            raise ValueError(
                f"migrations {found[version].name!r} and {entry.name!r} share a version"
            )
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate_postgres(
    url: str, *, connect_timeout: float = 10.0, **connect_kwargs: Any
) -> list[int]:
    """Apply pending PostgreSQL migrations; return the versions this call applied.

    Uses its own connection rather than a pool's: closing it is what guarantees the lock's
    release (by ending the transaction) even if we are cancelled midway.
    """
    migrations = await asyncio.to_thread(load_migrations, "postgres")
    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout, **connect_kwargs)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StoreUnavailable(f"cannot connect to PostgreSQL to migrate: {exc}") from exc
    try:
        return await _apply_postgres(conn, migrations)
    except (OSError, asyncpg.PostgresConnectionError) as exc:
        raise StoreUnavailable(f"PostgreSQL connection lost while migrating: {exc}") from exc
    finally:
        await asyncio.shield(conn.close())


async def _apply_postgres(conn: Any, migrations: list[Migration]) -> list[int]:
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        # Created under the lock: two first-ever starts racing on CREATE TABLE IF NOT EXISTS
        # can otherwise both try to create it, and one fails.
        await conn.execute(_PG_TABLE)
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations:
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
    return applied


def apply_sqlite(db: sqlite3.Connection, migrations: list[Migration]) -> list[int]:
    """Apply pending SQLite migrations in one transaction. Blocking: run it in the DB thread.

    ``executescript`` would commit any open transaction first, so each file is split into
    statements and executed inside our own ``BEGIN IMMEDIATE`` instead.
    """
    applied: list[int] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_SQLITE_TABLE)
        done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        for migration in migrations:
            if migration.version in done:
                continue
            for statement in _split_statements(migration.sql):
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                (migration.version, migration.name),
            )
            applied.append(migration.version)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return applied


def _split_statements(script: str) -> list[str]:
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        # complete_statement understands quoting and trigger bodies, unlike a naive split on ";".
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement at end of migration: {pending.strip()!r}")
    return statements
