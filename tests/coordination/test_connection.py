"""The Redis client factory in each mode, and the one-slot rule for every script."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from redis import __version__ as redis_version
from redis.asyncio.connection import Connection as RedisConnection
from redis.driver_info import DriverInfo

from tests.redis_topologies import Topology
from threadline.config import Settings
from threadline.coordination import keys, scripts
from threadline.coordination.connection import (
    endpoint,
    limits_storage,
    open_client,
    raised_in_client,
    ready,
)
from threadline.coordination.leases import bounded
from threadline.errors import CoordinatorUnavailable


def settings_of(topology: Topology) -> Settings:
    return Settings(_env_file=None, **topology.settings())  # type: ignore[call-arg]


def test_a_cluster_url_names_every_seed() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, redis_mode="cluster", redis_url="redis://:pw@h1:7000,h2:7001"
    )
    found = endpoint(settings)
    assert found.nodes == (("h1", 7000), ("h2", 7001))
    assert (found.db, found.password) == (0, "pw")


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_every_script_touches_one_slot(topology: Topology) -> None:
    """Each script, with the keys its caller gives it, on a real cluster: a script whose
    keys spanned slots would fail with CROSSSLOT."""
    sid = uuid.uuid4()
    session = [keys.lease(sid), keys.dirty(sid)]
    active, inflight = [keys.active(keys.bucket(sid))], [keys.inflight(keys.bucket(sid))]
    token, member = "node:1", f"{sid}|node:1"
    calls: dict[str, tuple[list[str], list[Any]]] = {
        "LIST": (active, [str(sid), 1000]),
        "CLAIM": (session, [token, 1000, 5000, "node"]),
        "NUDGE": (session, [token, 1000, 5000, "node"]),
        "RENEW": ([keys.lease(sid)], [token, 1000]),
        "RELEASE": (session, [token]),
        "UNLIST": (active, [str(sid), 0]),
        "DROP": ([keys.lease(sid)], [token]),
        "DUE": (active, [str(sid), 0]),
        "INFLIGHT": (inflight, [member, 1000]),
        "ANNOUNCED": (inflight, [member]),
        "STRANDED": (inflight, [10]),
        "ORPHANS": (active, [10]),
        "PUBLISH_EVENT": (
            [keys.events_log(sid)],
            [10, "{}", 1000, keys.events_channel(sid), "SPUBLISH"],
        ),
    }
    every = {name for name in dir(scripts) if name.isupper() and not name.startswith("_")}
    assert set(calls) == every, "a script without a case here"
    client = open_client(settings_of(topology), 4)
    try:
        await ready(client)
        for name, (keys_, args) in calls.items():
            await client.register_script(getattr(scripts, name))(keys=keys_, args=args)
    finally:
        await client.aclose()


async def test_the_rate_limiter_shares_its_window_in_each_mode(topology: Topology) -> None:
    """Two storages (two processes) count against one window."""
    item = RateLimitItemPerMinute(2)
    key = f"test-{uuid.uuid4()}"
    settings = settings_of(topology)
    async with (
        limits_storage(settings, "threadline-ratelimit", 2) as first,
        limits_storage(settings, "threadline-ratelimit", 2) as second,
    ):
        assert await MovingWindowRateLimiter(first).hit(item, key)
        assert await MovingWindowRateLimiter(second).hit(item, key)
        assert not await MovingWindowRateLimiter(first).hit(item, key)


async def test_what_redis_py_itself_raises_in_a_redis_step_is_coordinator_unavailable() -> None:
    # As a cluster failover can make it: a command sent on a connection that another task
    # closed under it fails inside redis-py with an AttributeError, not a RedisError.
    # (driver_info given: without it redis-py reads its package metadata, a blocking call)
    closed = RedisConnection(driver_info=DriverInfo(name="redis-py", lib_version=redis_version))
    with pytest.raises(CoordinatorUnavailable, match="the Redis client failed"):
        async with bounded(1.0):
            await closed._send_packed_command([b"PING"])
    assert not raised_in_client(AttributeError())
    # The same error raised by the code around the call stays what it is: a bug to see.
    ours: Any = None
    with pytest.raises(AttributeError):
        async with bounded(1.0):
            ours.writelines([b"PING"])
