"""Real server processes for the multi-process tests, sharing PostgreSQL and Redis.

A module whose tests take the ``topology`` fixture runs once per Redis mode it lists in
``REDIS_MODES`` (standalone only if it lists none): see ``tests/redis_topologies.py``.

Each server is ``python -m threadline serve`` in its own process group, with the agents of
``tests/mp_agents.py``. Its output is kept in memory and shown when something goes wrong. Every
wait here polls a condition (a port answering, a row landing); the test's timeout bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis import __version__ as redis_version
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from tests.conftest import service_url
from tests.redis_topologies import Mode, Topology, topology_of
from threadline.coordination.connection import Client
from threadline.store import PostgresStore, Session

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.01


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], callers: Sequence[asyncio.Task[Any]] = ()
) -> None:
    """Poll a condition owned by another process; the test's timeout bounds the wait.

    ``callers`` are requests that must still be waiting meanwhile: one that ends first (an
    error, say) fails the wait at once instead of leaving it to the timeout.
    """
    while not await predicate():
        for caller in callers:
            if caller.done():
                raise AssertionError(f"a caller finished early: {_describe(caller)}")
        await asyncio.sleep(POLL_S)


def _describe(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    if task.exception() is not None:
        return repr(task.exception())
    result = task.result()
    if isinstance(result, httpx.Response):
        return f"{result.status_code} {result.text}"
    return repr(result)


@dataclass
class Process:
    """A child process in its own process group, its output collected as it comes."""

    name: str
    process: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, name: str, *argv: str, env: dict[str, str], cwd: Path) -> Process:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self = cls(name, process)
        self.reader = asyncio.ensure_future(self._collect())
        return self

    async def _collect(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line.decode(errors="replace"))

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def logs(self) -> str:
        return f"--- output of {self.name} ---\n" + "".join(self.output[-200:])

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the process group, wait for the exit; SIGKILL if it does not go."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self.reader is not None:
            await self.reader


@dataclass
class Server:
    """A threadline server process listening on ``port``."""

    child: Process
    port: int

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class RedisServer:
    """A private ``redis-server`` listening on ``port``."""

    child: Process
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def server_env(database_url: str, redis: str | Topology, **settings: object) -> dict[str, str]:
    """The environment of a server process: ours minus any THREADLINE_ setting, plus these.
    ``redis``: a standalone Redis URL, or a topology of any mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(redis.env() if isinstance(redis, Topology) else {"THREADLINE_REDIS_URL": redis})
    env.update(
        THREADLINE_DATABASE_URL=database_url,
        THREADLINE_AGENTS_MODULE="tests.mp_agents",
        THREADLINE_POOL_MIN_SIZE="1",
        THREADLINE_POOL_MAX_SIZE="5",
        THREADLINE_SHUTDOWN_GRACE_S="1",
    )
    env.update({f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def start_servers(
    count: int, env: dict[str, str], cwd: Path, prefix: str = "server"
) -> list[Server]:
    """Start ``count`` servers on free loopback ports and wait until each answers /health."""
    servers: list[Server] = []
    try:
        for index in range(count):
            port = free_port()
            argv = (sys.executable, "-m", "threadline", "serve", "--port", str(port))
            child = await Process.start(f"{prefix}-{index}", *argv, env=env, cwd=cwd)
            servers.append(Server(child, port))
        async with httpx.AsyncClient(timeout=5) as client:
            await asyncio.gather(*(_healthy(client, s) for s in servers))
    except BaseException:
        await asyncio.gather(*(s.child.stop() for s in servers))
        raise
    return servers


@contextlib.asynccontextmanager
async def running_servers(
    count: int, env: dict[str, str], workdir: Path, name: str
) -> AsyncIterator[list[Server]]:
    """``start_servers``, stopped again on the way out (a module's ``servers`` fixture)."""
    started = await start_servers(count, env, workdir, name)
    try:
        yield started
    finally:
        await asyncio.gather(*(s.child.stop() for s in started))


@contextlib.asynccontextmanager
async def checked_client(servers: Sequence[Server]) -> AsyncIterator[httpx.AsyncClient]:
    """A client for a test; after it, every server must still be running."""
    async with httpx.AsyncClient(timeout=60) as opened:
        yield opened
    for server in servers:
        assert server.child.running, server.child.logs()


async def _healthy(client: httpx.AsyncClient, server: Server) -> None:
    while True:
        if not server.child.running:
            raise RuntimeError(f"{server.name} exited during start-up\n{server.child.logs()}")
        with contextlib.suppress(httpx.TransportError):
            if (await client.get(f"{server.url}/health")).status_code == 200:
                return
        await asyncio.sleep(POLL_S * 5)


def redis_client(url: str) -> Redis:
    # With the version given, redis-py skips reading its package metadata from disk (a
    # blocking call the event-loop guard would flag) on every new connection.
    return Redis.from_url(url, driver_info=DriverInfo(name="redis-py", lib_version=redis_version))


async def start_redis(binary: str, cwd: Path, port: int | None = None) -> RedisServer:
    """A private ``redis-server`` (no persistence) that a test may stop and restart."""
    port = port or free_port()
    argv = (binary, "--port", str(port), "--bind", "127.0.0.1")
    argv += ("--save", "", "--appendonly", "no", "--daemonize", "no")
    child = await Process.start(f"redis-{port}", *argv, env=dict(os.environ), cwd=cwd)
    client = redis_client(f"redis://127.0.0.1:{port}/0")
    try:
        while True:
            if not child.running:
                raise RuntimeError(f"redis-server exited during start-up\n{child.logs()}")
            with contextlib.suppress(RedisError, OSError):
                if await client.ping():
                    return RedisServer(child, port)
            await asyncio.sleep(POLL_S)
    except BaseException:
        await child.stop()
        raise
    finally:
        await client.aclose()


@dataclass
class GateCall:
    """One model call of the ``gated`` agent, held open until the test releases it."""

    prompt: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def release(self) -> None:
        self.writer.write(b"go\n")

    async def cancelled(self) -> None:
        """Return once the model call has gone: its process closed the connection."""
        assert await self.reader.read() == b"", "the gate got data instead of a close"


@dataclass
class Gate:
    """Where the ``gated`` agent's model calls report, in any server process."""

    port: int
    calls: asyncio.Queue[GateCall] = field(default_factory=asyncio.Queue)

    async def next(self) -> GateCall:
        """The next model call to start, in whichever process."""
        return await self.calls.get()

    def line(self) -> str:
        return f"gate {self.port}"


# -- requests and what the servers stored ------------------------------------------------

SEPARATOR = "\n---\n"  # between the messages of one prompt (runner.PROMPT_SEPARATOR)


def post(
    client: httpx.AsyncClient,
    server: Server,
    session_id: uuid.UUID,
    text: str,
    agent: str = "burst",
    **extra: Any,
) -> asyncio.Task[httpx.Response]:
    body = {"message_content": text, "session_id": str(session_id), **extra}
    return asyncio.create_task(client.post(f"{server.url}/api/v1/agent/{agent}/run", json=body))


async def stored(db: asyncpg.Pool, session_id: uuid.UUID, count: int) -> bool:
    """Whether ``count`` user messages of the session have landed."""
    return await user_messages(db, session_id) >= count


async def user_messages(db: asyncpg.Pool, session_id: uuid.UUID) -> int:
    query = "SELECT count(*) FROM messages WHERE session_id = $1 AND role = 'user'"
    count: int = await db.fetchval(query, session_id)
    return count


async def runs(db: asyncpg.Pool, session_id: uuid.UUID) -> list[asyncpg.Record]:
    query = (
        "SELECT id, status, message_ids, reply_message_id, superseded_by FROM runs"
        " WHERE session_id = $1"
    )
    found: list[asyncpg.Record] = await db.fetch(query, session_id)
    return found


async def history(client: httpx.AsyncClient, server: Server, session_id: uuid.UUID) -> Any:
    response = await client.get(f"{server.url}/api/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def describe(found: list[asyncpg.Record]) -> str:
    return "runs:\n" + "\n".join(
        f"{r['id']} {r['status']} answers={len(r['message_ids'])} "
        f"superseded_by={r['superseded_by']} reply={r['reply_message_id']}"
        for r in found
    )


def assert_one_runner(found: list[asyncpg.Record], winner: str) -> None:
    """One completed run (the winner); every other run was superseded and stored no reply.

    One runner opens each run only after the previous one has ended, for more messages than
    it: the runs answer ever longer prefixes of the winner's messages, never the same ones
    twice. (A run superseded before it opened leaves no row, so ``superseded_by`` may name a
    run that does not exist.)
    """
    ordered = sorted(found, key=lambda r: len(r["message_ids"]))
    assert [str(r["id"]) for r in found if r["status"] == "succeeded"] == [winner], describe(found)
    assert str(ordered[-1]["id"]) == winner, describe(found)
    for run in ordered[:-1]:
        assert run["status"] == "superseded", describe(found)
        assert run["superseded_by"] is not None, describe(found)
        assert run["reply_message_id"] is None, describe(found)
    answers = [list(r["message_ids"]) for r in ordered]
    for shorter, longer in itertools.pairwise(answers):
        assert len(shorter) < len(longer), describe(found)
        assert longer[: len(shorter)] == shorter, describe(found)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    return service_url("THREADLINE_TEST_DATABASE_URL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "topology" in metafunc.fixturenames:
        modes: tuple[Mode, ...] = getattr(metafunc.module, "REDIS_MODES", ("standalone",))
        metafunc.parametrize("topology", modes, indirect=True, scope="module")


@pytest.fixture(scope="module")
def topology(request: pytest.FixtureRequest) -> Topology:
    """The Redis of the module's servers, in one of its ``REDIS_MODES``."""
    return topology_of(request, request.param)


@pytest.fixture(scope="module")
def redis_dsn() -> str:
    return service_url("THREADLINE_TEST_REDIS_URL")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The servers' working directory: empty, so no stray .env or SQLite file is picked up."""
    return tmp_path_factory.mktemp("servers")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """Raw reads of what the servers wrote (runs per session have no API)."""
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.connect(pg_dsn, min_size=1, max_size=2)
    try:
        await opened.migrate()
        yield opened
    finally:
        await opened.aclose()


MakeSession = Callable[..., Awaitable[Session]]


@pytest_asyncio.fixture(loop_scope="module")
async def make_session(store: PostgresStore) -> AsyncIterator[MakeSession]:
    """Create sessions under a user id of this test's own; delete them afterwards."""
    user_id = f"mp-{uuid.uuid4().hex}"
    created: list[uuid.UUID] = []

    async def make(agent: str = "burst", **kwargs: Any) -> Session:
        session = await store.create_session(agent, user_id=user_id, **kwargs)
        created.append(session.id)
        return session

    yield make
    for session_id in created:
        await store.delete_session(session_id)


@pytest_asyncio.fixture(loop_scope="module")
async def gate() -> AsyncIterator[Gate]:
    opened: list[asyncio.StreamWriter] = []
    queue: asyncio.Queue[GateCall] = asyncio.Queue()

    async def arrive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer)
        line = await reader.readline()
        if line:
            await queue.put(GateCall(json.loads(line)["prompt"], reader, writer))

    server = await asyncio.start_server(arrive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Gate(port, queue)
    finally:
        server.close()
        for writer in opened:
            writer.close()
        await server.wait_closed()


@pytest_asyncio.fixture(loop_scope="module")
async def client(servers: list[Server]) -> AsyncIterator[httpx.AsyncClient]:
    """A checked client of the module's ``servers`` (each module starts its own)."""
    async with checked_client(servers) as opened:
        yield opened


async def listeners(redis: Client, *channels: str) -> dict[str, int]:
    """How many connections listen to each channel, plainly or sharded (whichever the servers
    use). (Pub/sub spans the Redis server's databases, where other test runs may listen too:
    only channels named by our own sessions and node ids are asked about.)"""
    counts = dict.fromkeys(channels, 0)
    for channel in channels:
        # In a cluster, a sharded channel's listeners are known to the shard that owns its
        # slot only: ask that one (redis-py would pick any node).
        shard: dict[str, Any] = {}
        if isinstance(redis, RedisCluster):
            shard["target_nodes"] = redis.get_node_from_key(channel)
        plain = await redis.pubsub_numsub(channel)
        sharded = await redis.pubsub_shardnumsub(channel, **shard)
        for c, n in [*plain, *sharded]:
            counts[c.decode() if isinstance(c, bytes) else c] += int(n)
    return counts
