"""App fixtures (a real app with its lifespan running, reached through httpx); a plugin."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from threadline.agents import AgentSpec
from threadline.api.deps import Services
from threadline.app import create_app
from threadline.config import Settings

AppFactory = Callable[
    ..., contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, FastAPI]]
]


@pytest.fixture(params=["sqlite", "postgres", "postgres+redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Store and coordinator: every API test runs on each combination that serves."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> str:
    if backend.startswith("postgres"):
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path}/api.db"


@pytest.fixture
def coordinator_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("redis_url")) if backend.endswith("+redis") else None


def _settings(database_url: str, coordinator_url: str | None, **overrides: Any) -> Settings:
    overrides.setdefault("database_url", database_url)
    overrides.setdefault("redis_url", coordinator_url)
    # The test process keeps the interpreter's own GC settings.
    overrides.setdefault("gc_tuning", False)
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.fixture
def make_app(database_url: str, coordinator_url: str | None) -> AppFactory:
    """Start an app (lifespan included) with settings overrides and extra agents."""

    @contextlib.asynccontextmanager
    async def start(
        agents: Sequence[AgentSpec] = (), **overrides: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
        app = create_app(_settings(database_url, coordinator_url, **overrides), agents)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://threadline", timeout=30
            ) as client:
                yield client, app

    return start


@pytest.fixture
def make_server(database_url: str, coordinator_url: str | None) -> AppFactory:
    """Like ``make_app``, but served by uvicorn on a local port: httpx's in-process transport
    hands a response over only once it is complete, and streams must be read as they go."""

    @contextlib.asynccontextmanager
    async def start(
        agents: Sequence[AgentSpec] = (), **overrides: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
        app = create_app(_settings(database_url, coordinator_url, **overrides), agents)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if task.done():
                    task.result()  # start-up failed: raise why
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                yield client, app
        finally:
            server.should_exit = True
            await task

    return start


def services(app: FastAPI) -> Services:
    found: Services = app.state.services
    return found
