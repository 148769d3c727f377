"""threadline behind PgBouncer in transaction mode (``THREADLINE_DATABASE_POOLER``).

PgBouncer 1.18 (Debian 12's) in ``pool_mode = transaction`` gives a client a server
connection for one transaction only. asyncpg's cached statements are named prepared
statements that live on one server connection, so behind the bouncer they turn up missing on
the next one; the pooler setting turns the cache off and makes migrations lock per
transaction. The bouncer has fewer server connections than threadline opens, so statements
really do move between server connections here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import uuid4

import asyncpg
import httpx
import pytest

from tests.pgbouncer import pgbouncer
from tests.serving import serving
from threadline.store import PostgresStore
from threadline.store.migrations import migrate_postgres

pytestmark = pytest.mark.allow_blocking  # starts and stops PgBouncer and a server process

SESSIONS = 12
MESSAGES = 4


async def _lookups(store: PostgresStore, count: int) -> list[BaseException | None]:
    results = await asyncio.gather(
        *(store.get_message(uuid4()) for _ in range(count)), return_exceptions=True
    )
    return [r if isinstance(r, BaseException) else None for r in results]


async def test_cached_statements_break_behind_the_bouncer(fresh_pg_database: str) -> None:
    """Why the setting exists: with asyncpg's statement cache, statements fail."""
    with pgbouncer(fresh_pg_database) as url:
        await migrate_postgres(fresh_pg_database)
        store = await PostgresStore.connect(url, min_size=8, max_size=8)
        try:
            failures = [e for e in await _lookups(store, 2_000) if e is not None]
        finally:
            await store.aclose()

    assert failures
    assert all(isinstance(e, asyncpg.InvalidSQLStatementNameError) for e in failures)


async def test_the_store_without_a_statement_cache_works_behind_the_bouncer(
    fresh_pg_database: str,
) -> None:
    with pgbouncer(fresh_pg_database) as url:
        results = await asyncio.gather(
            *(migrate_postgres(url, statement_cache_size=0) for _ in range(3))
        )
        store = await PostgresStore.connect(url, min_size=8, max_size=8, statement_cache=False)
        try:
            failures = [e for e in await _lookups(store, 2_000) if e is not None]
        finally:
            await store.aclose()

    # Three migrators through the bouncer: the transaction-level lock let exactly one apply.
    assert sorted(results, key=len) == [[], [], [1, 2, 3, 4, 5]]
    assert failures == []


async def test_a_server_behind_the_bouncer_answers_every_message(
    fresh_pg_database: str, tmp_path: Path
) -> None:
    """A real server whose only way to PostgreSQL is the bouncer: it migrates a new database
    through it and answers concurrent conversations, every message kept in order."""
    with (
        pgbouncer(fresh_pg_database) as url,
        serving(
            tmp_path / "server.log",
            THREADLINE_DATABASE_URL=url,
            THREADLINE_DATABASE_POOLER="pgbouncer-transaction",
            THREADLINE_POOL_MAX_SIZE="10",
        ) as base,
    ):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def conversation(n: int) -> list[int]:
                statuses = []
                for m in range(MESSAGES):
                    reply = await client.post(
                        "/api/v1/agent/echo/run",
                        json={
                            "message_content": f"s{n} m{m}",
                            "session_name": f"bouncer-{n}",
                            "user_id": "bouncer",
                        },
                    )
                    statuses.append(reply.status_code)
                return statuses

            statuses = await asyncio.gather(*(conversation(n) for n in range(SESSIONS)))
            history = (
                await client.get("/api/v1/sessions/bouncer-3", params={"user_id": "bouncer"})
            ).json()

    assert statuses == [[200] * MESSAGES] * SESSIONS
    user_texts = [m["content"] for m in history["messages"] if m["role"] == "user"]
    assert user_texts == [f"s3 m{m}" for m in range(MESSAGES)]
