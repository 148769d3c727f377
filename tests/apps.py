"""App fixtures (a real app with its lifespan running, reached through httpx); a plugin."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
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


@pytest.fixture
def make_app(database_url: str, coordinator_url: str | None) -> AppFactory:
    """Start an app (lifespan included) with settings overrides and extra agents."""

    @contextlib.asynccontextmanager
    async def start(
        agents: Sequence[AgentSpec] = (), **overrides: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
        overrides.setdefault("database_url", database_url)
        overrides.setdefault("redis_url", coordinator_url)
        # The test process keeps the interpreter's own GC settings.
        overrides.setdefault("gc_tuning", False)
        settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
        app = create_app(settings, agents)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://threadline", timeout=30
            ) as client:
                yield client, app

    return start


def services(app: FastAPI) -> Services:
    found: Services = app.state.services
    return found
