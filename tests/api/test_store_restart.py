"""A PostgreSQL restart gives 503 ``store_unavailable`` to the requests it meets, and the
pool serves the next request after recovery on fresh connections.

The restart is real: a private cluster this test creates and restarts with ``pg_ctl``, never
the shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from tests.apps import AppFactory, services

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
CAN_RUN_SERVER = bool(BINARIES) and os.geteuid() == 0 and shutil.which("runuser") is not None


@dataclass
class Cluster:
    data: str
    sockets: str
    port: int

    @property
    def log(self) -> str:
        return f"{self.sockets}/log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def pg_ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_prepared_transactions=2"
        )
        await _as_postgres(f"{BINARIES[-1]}/pg_ctl", "-D", self.data, "-w", "-o", options, *args)


async def _as_postgres(*argv: str) -> None:
    # initdb and postgres refuse to run as root. No pipes: the server pg_ctl starts would
    # inherit them and keep them open; its output goes to the cluster's log file instead.
    process = await asyncio.create_subprocess_exec(
        "runuser", "-u", "postgres", "--", *argv,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await process.wait() == 0, f"{' '.join(argv)} failed"


def _private_dir() -> str:
    # Not pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    root = tempfile.mkdtemp(prefix="tl-pg-")
    shutil.chown(root, "postgres")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    if not CAN_RUN_SERVER:
        pytest.skip("needs PostgreSQL server binaries and root (to run them as 'postgres')")
    root = await asyncio.to_thread(_private_dir)
    found = Cluster(data=f"{root}/data", sockets=root, port=_free_port())
    await _as_postgres(
        f"{BINARIES[-1]}/initdb", "-D", found.data, "-A", "trust", "-U", "postgres", "--no-sync"
    )
    await found.pg_ctl("-l", found.log, "start")
    try:
        yield found
    finally:
        with contextlib.suppress(AssertionError):
            await found.pg_ctl("-m", "immediate", "stop")
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_mid_request_is_503_and_the_next_request_succeeds(
    make_app: AppFactory, cluster: Cluster, mode: str
) -> None:
    async with make_app(database_url=cluster.url, pool_min_size=3) as (client, _):
        created = await client.post("/api/v1/agent/echo/run", json={"message_content": "hi"})
        assert created.status_code == 200, created.text
        session_id = created.json()["session_id"]
        # Hold the session row so that the DELETE below is in flight on the server when the
        # restart hits it. In a prepared transaction: a plain one's backend may die first in
        # the shutdown and free the row, and the DELETE then commits before its own backend
        # is stopped (204 instead of 503); a prepared transaction outlives the restart.
        locker = await asyncpg.connect(cluster.url)
        try:
            await locker.execute("BEGIN")
            await locker.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", session_id)
            await locker.execute("PREPARE TRANSACTION 'hold-session'")
            delete = asyncio.ensure_future(client.delete(f"/api/v1/sessions/{session_id}"))
            while not await locker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ):
                assert not delete.done(), delete.result().text
                await asyncio.sleep(0.01)
            await cluster.pg_ctl("-l", cluster.log, "-m", mode, "restart")
        finally:
            locker.terminate()
        met = await delete
        releaser = await asyncpg.connect(cluster.url)
        try:
            await releaser.execute("ROLLBACK PREPARED 'hold-session'")
        finally:
            await releaser.close()
        assert met.status_code == 503, met.text
        assert met.json()["error"]["code"] == "store_unavailable"
        # Every pooled connection died with the server; none may be handed out again.
        for _ in range(6):
            again = await client.get(f"/api/v1/sessions/{session_id}")
            assert again.status_code == 200, again.text
        ran = await client.post(
            "/api/v1/agent/echo/run", json={"message_content": "back", "session_id": session_id}
        )
        assert ran.status_code == 200, ran.text


async def test_a_pool_closed_under_the_store_is_503(make_app: AppFactory, pg_url: str) -> None:
    # asyncpg raises InterfaceError ("pool is closed" / "pool is closing") here: the pool is
    # gone, which for a caller is the store being unavailable, not a server fault.
    async with make_app() as (client, app):
        await services(app).store.pool.close()  # type: ignore[attr-defined]
        r = await client.get("/api/v1/sessions")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        # The driver's words stay in the log.
        assert "pool" not in r.json()["error"]["message"]
        ready = await client.get("/ready")
        assert ready.status_code == 503, ready.text
