"""Shared fixtures: real services, the event-loop blocking guard, and settings factories.

PostgreSQL and Redis tests run when THREADLINE_TEST_DATABASE_URL / THREADLINE_TEST_REDIS_URL are
set. Without them they skip, unless THREADLINE_REQUIRE_SERVICES=1 (as in CI), which turns a
missing service into a failure so a green run always means the integration tests ran.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Generator, Iterator
from typing import Any

import fastapi.dependencies.models
import pytest
import redis
from blockbuster import BlockBuster, blockbuster_ctx

from threadline.config import Settings

pytest_plugins = ["tests.apps", "tests.redis_topologies"]

REQUIRE_SERVICES = os.environ.get("THREADLINE_REQUIRE_SERVICES") == "1"


def service_url(var: str) -> str:
    url = os.environ.get(var)
    if url:
        return url
    if REQUIRE_SERVICES:
        pytest.fail(f"{var} is unset but THREADLINE_REQUIRE_SERVICES=1")
    pytest.skip(f"{var} is unset: set it to run tests against the real service")


@pytest.fixture
def pg_url() -> str:
    return service_url("THREADLINE_TEST_DATABASE_URL")


def empty_test_redis() -> str:
    """The test Redis database, emptied: a test's app would otherwise find in its orphan index
    the sessions an earlier test's apps left listed at their shutdown, take them over and run
    their messages in the middle of this test (each SQLite test gets a new file alike)."""
    url = service_url("THREADLINE_TEST_REDIS_URL")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def redis_url() -> str:
    return empty_test_redis()


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail any test whose code blocks the event loop (pydantic-ai does the same).

    Tests that must block on purpose (starting subprocesses, say) opt out with
    ``@pytest.mark.allow_blocking``.
    """
    if request.node.get_closest_marker("allow_blocking"):
        yield None
        return
    with blockbuster_ctx(["threadline", "tests"]) as bb:
        # asyncpg looks for ~/.pgpass and client certificates with synchronous file calls
        # when it opens a connection: once per pool connection, never per query.
        for name, function in bb.functions.items():
            if name.startswith(("os.", "io.", "builtins.open")):
                function.can_block_in("asyncpg/connect_utils.py", {"_parse_connect_dsn_and_args"})
        # StaticFiles (the chat page, the offline API docs) checks its directory once, when
        # create_app builds the app; files are served through a thread.
        bb.functions["os.stat"].can_block_in("starlette/staticfiles.py", {"__init__"})
        yield bb


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_blocking: the test may block the event loop")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """After each test's fixtures are gone, free what it left and freeze what outlives it.

    This process builds hundreds of apps, and FastAPI keeps every app's endpoints (closures over
    the app) in module-level caches of 4,096 entries: up to ~80 dead apps, over a million
    objects, stayed reachable. Each full collection walked them all, and the collector took
    1-2 s at a time here, inside whichever test was running: enough to fail a 4 s Redis
    connect. Emptied caches, one collection of what this test made, and a freeze of what
    survives (modules, session fixtures: as ``tune_gc`` does in a server) keep every later
    collection down to the objects of the test in progress.
    """
    try:
        return (yield)
    finally:
        for value in vars(fastapi.dependencies.models).values():
            cache_clear = getattr(value, "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
        gc.collect()
        gc.freeze()


@pytest.fixture
def make_settings(tmp_path: Any) -> Any:
    """Build Settings for a test, on a fresh SQLite file unless a database_url is given."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("database_url", f"sqlite:///{tmp_path}/threadline.db")
        return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]

    return make
