"""Migrations: ordered, recorded, idempotent, and safe when several processes start at once."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from threadline.store import SQLiteStore
from threadline.store.migrations import load_migrations, migrate_postgres

TABLES = {"schema_migrations", "sessions", "messages", "runs", "deliveries"}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_migration_files_load_in_version_order(backend: Any) -> None:
    migrations = await asyncio.to_thread(load_migrations, backend)

    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions))
    assert migrations[0].name == "001_init.sql"
    assert "CREATE TABLE sessions" in migrations[0].sql


async def test_sqlite_migrations_are_idempotent(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/migrate.db"
    first = await SQLiteStore.connect(url)
    second = await SQLiteStore.connect(url)
    try:
        assert await first.migrate() == [1, 2, 3, 4]
        assert await first.migrate() == []
        assert await second.migrate() == []

        def applied(db: Any) -> list[tuple[int, str]]:
            return [tuple(r) for r in db.execute("SELECT version, name FROM schema_migrations")]

        assert await second._run(applied, transaction=False) == [
            (1, "001_init.sql"),
            (2, "002_failure_semantics.sql"),
            (3, "003_idempotency_keys.sql"),
            (4, "004_deliveries.sql"),
        ]
    finally:
        await first.aclose()
        await second.aclose()


async def test_concurrent_postgres_migrators_apply_once(fresh_pg_database: str) -> None:
    results = await asyncio.gather(*(migrate_postgres(fresh_pg_database) for _ in range(5)))

    assert sorted(results) == [[], [], [], [], [1, 2, 3, 4, 5]]
    assert await migrate_postgres(fresh_pg_database) == []
    conn = await asyncpg.connect(fresh_pg_database)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations")
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        indexes = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        (1, "001_init.sql"),
        (2, "002_runs_message_ids.sql"),
        (3, "003_failure_semantics.sql"),
        (4, "004_idempotency_keys.sql"),
        (5, "005_deliveries.sql"),
    ]
    assert {r["tablename"] for r in tables} == TABLES
    assert {"runs_message_ids", "messages_idempotency_key"} <= {r["indexname"] for r in indexes}
