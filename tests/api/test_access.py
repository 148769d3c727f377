"""Who may do what: the loopback rule without an API key, the debug routes, session ownership."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.api.test_api import assert_error
from tests.apps import AppFactory, services
from tests.multiprocess.conftest import Process, wait_until
from threadline.agents import AgentSpec

REMOTE = ("10.1.2.3", 40000)


@contextlib.asynccontextmanager
async def client_from(app: FastAPI, peer: tuple[str, int]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=peer, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as client:
        yield client


async def test_without_api_key_other_machines_get_403_on_every_path(
    make_app: AppFactory,
) -> None:
    user = f"u-{uuid.uuid4()}"
    async with make_app() as (_, app), client_from(app, REMOTE) as remote:
        run = {"message_content": "hi", "user_id": user}
        assert_error(await remote.post("/api/v1/agent/echo/run", json=run), 403, "forbidden")
        for path in ("/api/v1/agents", "/docs", "/openapi.json", "/debug/metrics", "/nowhere"):
            assert_error(await remote.get(path), 403, "forbidden")
        assert_error(await remote.post("/debug/metrics/reset"), 403, "forbidden")
        # A header anyone can send does not make a peer local.
        spoofed = await remote.get("/api/v1/agents", headers={"X-Forwarded-For": "127.0.0.1"})
        assert_error(spoofed, 403, "forbidden")
        assert (await remote.get("/health")).json() == {"status": "ok"}
        _, total = await services(app).store.list_sessions(user_id=user)
        assert total == 0


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_without_api_key_loopback_peers_are_served(make_app: AppFactory, peer: str) -> None:
    async with make_app() as (_, app), client_from(app, (peer, 40000)) as local:
        r = await local.post("/api/v1/agent/echo/run", json={"message_content": "hi"})
        assert r.status_code == 200, r.text
        assert (await local.get("/docs")).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_with_api_key_other_machines_are_served_with_the_key(make_app: AppFactory) -> None:
    async with make_app(api_key="s3cret") as (_, app), client_from(app, REMOTE) as remote:
        assert_error(await remote.get("/api/v1/agents"), 401, "unauthorized")
        ok = await remote.get("/api/v1/agents", headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200


@pytest.mark.allow_blocking
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_server_bound_to_all_addresses_serves_only_loopback(
    database_url: str, tmp_path: Path
) -> None:
    """``uvicorn --host 0.0.0.0`` bypasses ``threadline serve``'s check; the app still holds."""
    address = _non_loopback_address()
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(THREADLINE_DATABASE_URL=database_url, THREADLINE_GC_TUNING="false")
    argv = (sys.executable, "-m", "uvicorn", "--factory", "threadline.app:create_app")
    argv += ("--host", "0.0.0.0", "--port", str(port))
    server = await Process.start("uvicorn-0.0.0.0", *argv, env=env, cwd=tmp_path)
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def healthy() -> bool:
                assert server.running, server.logs()
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(f"http://127.0.0.1:{port}/health")).is_success
                return False

            await wait_until(healthy)
            remote = await client.get(f"http://{address}:{port}/api/v1/agents")
            assert_error(remote, 403, "forbidden")
            assert (await client.get(f"http://{address}:{port}/health")).status_code == 200
            local = await client.get(f"http://127.0.0.1:{port}/api/v1/agents")
            assert local.status_code == 200, local.text
    finally:
        await server.stop()
    assert "binds to loopback" not in server.logs()
    assert "clients from other machines get 403" in server.logs()


def _non_loopback_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
        except OSError:
            pytest.skip("this machine has no non-loopback IPv4 route to test through")
        address: str = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to test through")
    return address


async def test_debug_metrics_need_the_api_key_when_one_is_set(make_app: AppFactory) -> None:
    key = {"X-API-Key": "s3cret"}
    async with make_app(api_key="s3cret") as (client, _):
        assert_error(await client.get("/debug/metrics"), 401, "unauthorized")
        assert_error(await client.post("/debug/metrics/reset"), 401, "unauthorized")
        assert (await client.get("/debug/metrics", headers=key)).status_code == 200
        assert (await client.post("/debug/metrics/reset", headers=key)).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_metrics_reset_is_a_post_and_a_get_changes_nothing(make_app: AppFactory) -> None:
    async with make_app() as (client, app):
        monitor = services(app).monitor
        # A lag no real tick produces marks the window: it survives until a reset.
        monitor._lags.append(1000.0)
        await client.get("/debug/metrics", params={"reset": "true"})
        assert monitor.snapshot()["max_ms"] == 1_000_000
        reset = await client.post("/debug/metrics/reset")
        assert reset.status_code == 200, reset.text
        assert reset.json()["loop_lag"]["max_ms"] == 1_000_000  # what it was before
        assert monitor.snapshot()["max_ms"] < 1_000_000


async def test_an_agent_cannot_write_into_another_agents_session(make_app: AppFactory) -> None:
    user = f"u-{uuid.uuid4()}"
    other = AgentSpec(name="other", model="threadline:echo")
    async with make_app(agents=[other]) as (client, app):
        body = {"message_content": "mine", "session_name": "chat", "user_id": user}
        first = await client.post("/api/v1/agent/echo/run", json=body)
        assert first.status_code == 200, first.text
        session_id = first.json()["session_id"]
        by_name = await client.post("/api/v1/agent/other/run", json=body)
        assert_error(by_name, 409, "session_agent_mismatch")
        assert "'echo'" in by_name.json()["error"]["message"]
        by_id = await client.post(
            "/api/v1/agent/other/run", json={"message_content": "x", "session_id": session_id}
        )
        assert_error(by_id, 409, "session_agent_mismatch")
        _, total = await services(app).store.list_messages(uuid.UUID(session_id))
        assert total == 2  # the first turn only
        again = await client.post("/api/v1/agent/echo/run", json=body)
        assert again.status_code == 200, again.text


async def test_listing_sessions_without_user_id_shows_only_sessions_without_user(
    make_app: AppFactory,
) -> None:
    user = f"u-{uuid.uuid4()}"
    async with make_app() as (client, _):
        mine = await client.post(
            "/api/v1/agent/echo/run", json={"message_content": "x", "user_id": user}
        )
        anonymous = await client.post("/api/v1/agent/echo/run", json={"message_content": "y"})
        listed = (await client.get("/api/v1/sessions", params={"page_size": 500})).json()
        ids = {s["id"] for s in listed["sessions"]}
        assert anonymous.json()["session_id"] in ids
        assert mine.json()["session_id"] not in ids
        assert all(s["user_id"] is None for s in listed["sessions"])
        own = (await client.get("/api/v1/sessions", params={"user_id": user})).json()
        assert [s["id"] for s in own["sessions"]] == [mine.json()["session_id"]]
