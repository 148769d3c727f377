"""A database that goes away gives clear 503s, not hangs or bare 500s."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.apps import AppFactory, services
from tests.tcp_proxy import tcp_proxy


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_store_unreachable_is_503(make_app: AppFactory, pg_url: str) -> None:
    parts = urlsplit(pg_url)
    async with tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        async with make_app(database_url=via_proxy, pool_min_size=1) as (client, _):
            ok = await client.post("/api/v1/agent/echo/run", json={"message_content": "before"})
            assert ok.status_code == 200, ok.text
            await proxy.cut()
            ready = await client.get("/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["error"]["code"] == "store_unavailable"
            down = await client.post("/api/v1/agent/echo/run", json={"message_content": "during"})
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "store_unavailable"
            assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_connection_closed_under_the_store_is_503(make_app: AppFactory) -> None:
    # aiosqlite raises a bare ValueError("Connection closed") once its worker has stopped.
    async with make_app() as (client, app):
        await services(app).store._conn.close()  # type: ignore[attr-defined]
        r = await client.get("/api/v1/sessions")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        assert "Connection closed" not in r.json()["error"]["message"]
