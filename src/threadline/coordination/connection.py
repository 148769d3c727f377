"""The Redis clients of the configured topology (``THREADLINE_REDIS_MODE``): one factory for
every client threadline opens (the coordinator's pools, the run events' pool, the rate
limiter's storage), so that each mode is set up in one place.

* ``standalone``: one server, from ``REDIS_URL``; a bounded pool whose callers queue for a
  connection.
* ``cluster``: ``redis.asyncio.RedisCluster`` from the seed node(s) in ``REDIS_URL``
  (``redis://h1:p1,h2:p2`` or ``redis://h1:p1,redis://h2:p2``); it learns the slot map from any
  seed that answers and follows MOVED/ASK itself. Every script threadline runs touches keys of
  one slot (``keys.py``), which is what a cluster requires.
* ``sentinel``: ``redis.asyncio.sentinel.Sentinel`` over ``REDIS_SENTINELS``, and its client of
  the ``REDIS_SENTINEL_SERVICE`` master, which asks the sentinels again for the master when a
  connection fails (a failover). ``REDIS_URL``, if set, gives the db, user and password only.

Nothing here connects: clients connect on their first command.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from limits.aio.storage import RedisClusterStorage, RedisSentinelStorage, RedisStorage, Storage
from redis import __version__ as redis_version
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from threadline.config import Settings

# What a Redis call raises when Redis cannot serve it. redis-py's cluster client raises
# ``RedisClusterException`` (not a ``RedisError``) when no node answers or a slot has no owner.
FAILURES = (RedisError, RedisClusterException, OSError)
_REDIS_PY = os.path.dirname(redis.__file__) + os.sep

# Either client: both run the commands threadline uses (scripts, pipelines, pub/sub).
Client = Redis | RedisCluster
Script = AsyncScript
# One step of a pipeline: a script, its keys, its arguments.
Call = tuple[Script, list[str], list[Any]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a ``REDIS_URL`` says: where (one or more nodes) and as whom."""

    nodes: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None
    ssl: bool


def endpoint(settings: Settings) -> Endpoint:
    """``REDIS_URL`` read as one URL, or as several seeds separated by commas."""
    url = settings.redis_url or "redis://"
    ssl = url.startswith("rediss://")
    scheme = "rediss://" if ssl else "redis://"
    nodes: list[tuple[str, int]] = []
    db = 0
    username = password = None
    for part in url.split(","):
        part = part.strip()
        parsed: dict[str, Any] = dict(parse_url(part if "://" in part else scheme + part))
        nodes.append((parsed.get("host", "localhost"), int(parsed.get("port", 6379))))
        db = max(db, int(parsed.get("db", 0)))
        username = username or parsed.get("username")
        password = password or parsed.get("password")
    return Endpoint(tuple(nodes), db, username, password, ssl)


def raised_in_client(exc: BaseException) -> bool:
    """Whether ``exc`` came out of redis-py (a frame of its code is on the way), whatever its
    type. During a cluster failover redis-py's cluster client can trip over a connection that
    another task closed under it, seen as ``AttributeError: 'NoneType' object has no attribute
    'writelines'`` and as uvloop's ``RuntimeError: unable to perform operation on
    <TCPTransport closed=True ...>`` from ``Connection._send_packed_command``: Redis could not
    serve the call, which is not a bug of the code around it."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_REDIS_PY):
            return True
        tb = tb.tb_next
    return False


def _common(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        # Given explicitly, redis-py skips reading its package metadata from disk, a blocking
        # call on the event loop, on every new connection.
        "driver_info": DriverInfo(name="redis-py", lib_version=redis_version),
    }


class SentinelMaster(Redis):
    """The client of a Sentinel-managed master, which closes its connections to the
    sentinels too (redis-py's ``Sentinel`` has no close of its own)."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            for client in self.sentinels.sentinels:
                await client.aclose()


def open_client(settings: Settings, max_connections: int) -> Client:
    """A client of the configured topology with at most ``max_connections`` connections
    (per node, in a cluster). Every call is also bounded as a whole by REDIS_TIMEOUT_S by
    its caller (``leases.bounded``)."""
    common = _common(settings)
    if settings.redis_mode == "cluster":
        where = endpoint(settings)
        # A full pool raises at once here (redis-py's cluster pools do not queue); the
        # caller's bound turns that into the same 503 as a timeout.
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in where.nodes],
            max_connections=max_connections,
            username=where.username,
            password=where.password,
            ssl=where.ssl,
            health_check_interval=30,
            **common,
        )
    if settings.redis_mode == "sentinel":
        where = endpoint(settings)
        assert settings.redis_sentinel_service is not None  # checked by Settings
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels(settings),
            sentinel_kwargs=common,
            **common,
        )
        client: SentinelMaster = sentinel.master_for(
            settings.redis_sentinel_service,
            redis_class=SentinelMaster,
            db=where.db,
            username=where.username,
            password=where.password,
            max_connections=max_connections,
            # One retry: a connection to the old master fails, the retry asks the sentinels.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        client.sentinels = sentinel
        return client
    assert settings.redis_url is not None
    # A bounded pool: a burst of requests queues for a connection instead of opening one per
    # request.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        **common,
    )
    return Redis.from_pool(pool)


async def ready(client: Client) -> None:
    """Connect: a cluster client learns the slot map (its pub/sub needs it before any
    command); the others answer a PING."""
    if isinstance(client, RedisCluster):
        await client.initialize()
    else:
        await client.ping()


async def pipelined(client: Client, calls: Sequence[Call]) -> list[Any]:
    """Run scripts in one round trip per node (no transaction), in any mode. Returns each
    call's reply, or its exception (the caller decides what a failure means)."""
    replies = await _send(client, calls)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        # A cluster pipeline does not load scripts first, as a plain one does (a node
        # restarted, or its first use): load them on every primary, then send again only the
        # calls that did not run, so that none runs twice.
        for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
            await client.script_load(script.script)
        again = await _send(client, [calls[i] for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


async def _send(client: Client, calls: Sequence[Call]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            # EVALSHA by hand, in every mode: redis-py refuses a script object in a cluster
            # pipeline, and in a plain one it sends SCRIPT EXISTS before every execute (one
            # more round trip per pipeline); a script the server lacks comes back as
            # NoScriptError, which ``pipelined`` handles.
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)


def sentinels(settings: Settings) -> list[tuple[str, int]]:
    found = []
    for address in settings.redis_sentinels:
        host, _, port = address.rpartition(":")
        found.append((host, int(port)))
    return found


@contextlib.asynccontextmanager
async def limits_storage(
    settings: Settings, prefix: str, max_connections: int
) -> AsyncIterator[Storage]:
    """The rate limiter's storage (``limits``) on the configured topology, on connections of
    its own, closed on exit. The URI picks the implementation; the options are our client
    settings."""
    options: dict[str, Any] = {**_common(settings), "max_connections": max_connections}
    storage: RedisStorage | RedisClusterStorage | RedisSentinelStorage
    pool: BlockingConnectionPool | None = None
    if settings.redis_mode == "cluster":
        where = endpoint(settings)
        nodes = ",".join(f"{host}:{port}" for host, port in where.nodes)
        auth = f"{where.username or ''}:{where.password}@" if where.password else ""
        storage = RedisClusterStorage(
            f"async+redis+cluster://{auth}{nodes}",
            implementation="redispy",
            key_prefix=prefix,
            **options,
        )
    elif settings.redis_mode == "sentinel":
        where = endpoint(settings)
        options["db"] = where.db
        if where.password:
            options["password"] = where.password
        addresses = ",".join(f"{host}:{port}" for host, port in sentinels(settings))
        storage = RedisSentinelStorage(
            f"async+redis+sentinel://{addresses}/{settings.redis_sentinel_service}",
            implementation="redispy",
            key_prefix=prefix,
            sentinel_kwargs=_common(settings),
            **options,
        )
    else:
        assert settings.redis_url is not None
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=max_connections,
            timeout=settings.redis_timeout_s,
            **_common(settings),
        )
        # The URI only picks the implementation: connections come from our pool.
        pooled: dict[str, Any] = {"connection_pool": pool}  # typed as scalars in limits
        storage = RedisStorage(
            "async+redis://", implementation="redispy", key_prefix=prefix, **pooled
        )
    try:
        yield storage
    finally:
        if pool is not None:
            await pool.aclose()
        else:
            # limits has no close of its own: its clients are on the bridge it built.
            bridge: Any = storage.bridge
            clients = [getattr(bridge, name, None) for name in ("storage", "storage_replica")]
            sentinel = getattr(bridge, "sentinel", None)
            clients += sentinel.sentinels if sentinel is not None else []
            for client in clients:
                if client is not None:
                    await client.aclose()
