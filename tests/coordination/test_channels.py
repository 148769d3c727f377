"""``Channels`` on a real Redis Cluster of its own (started here, since these tests break it):
every message reaches its listener on every shard, a lost connection and a moved slot are
followed, and the watchers' owners are told to catch up.

Before each shard had a reader of its own, redis-py's cluster pub/sub polled the shard
connections in turn, with a short timeout each, and lost messages: a routing test saw a
watching process receive 1 of a session's 6 events.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis import __version__ as redis_version
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.driver_info import DriverInfo

from tests.redis_topologies import Topology, running, start_cluster
from threadline.coordination import keys, scripts
from threadline.coordination.channels import Channels, Kind
from threadline.coordination.connection import pipelined

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

PER_CHANNEL = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with running(start_cluster(tmp_path_factory.mktemp("channels-cluster"))) as topology:
        yield topology


@pytest.fixture
async def redis(cluster: Topology) -> AsyncIterator[RedisCluster]:
    client = cluster.client()
    assert isinstance(client, RedisCluster)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


class Heard:
    """What a ``Channels`` heard, per channel, and a wake-up for each message."""

    def __init__(self) -> None:
        self.messages: dict[str, list[bytes]] = {}
        self.changed = asyncio.Event()
        self.lost = asyncio.Event()

    def handler(self, channel: str) -> Any:
        self.messages.setdefault(channel, [])

        def handle(data: bytes) -> Kind:
            self.messages[channel].append(data)
            self.changed.set()
            return "event"

        return handle

    async def until(self, channel: str, count: int) -> list[bytes]:
        while len(self.messages[channel]) < count:
            self.changed.clear()
            await self.changed.wait()
        return self.messages[channel]


@contextlib.asynccontextmanager
async def listening(redis: RedisCluster, heard: Heard) -> AsyncIterator[Channels]:
    channels = Channels(redis, redis, sharded=True, timeout_s=2.0)
    channels.on_lost(heard.lost.set)
    await channels.open(keys.node_channel("here"), heard.handler(keys.node_channel("here")))
    task = asyncio.create_task(channels.listen())
    try:
        yield channels
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await channels.aclose()


def spread(redis: RedisCluster, per_shard: int) -> list[str]:
    """Event channels of new sessions, ``per_shard`` on each shard."""
    found: dict[str, list[str]] = {n.name: [] for n in redis.get_primaries()}
    while any(len(names) < per_shard for names in found.values()):
        channel = keys.events_channel(uuid.uuid4())
        names = found[redis.get_node_from_key(channel).name]
        if len(names) < per_shard:
            names.append(channel)
    return [channel for names in found.values() for channel in names]


async def publish_events(redis: RedisCluster, channel: str, payloads: list[str]) -> None:
    """As run events go: appended to the session's log and SPUBLISHed by one script each,
    in one pipeline."""
    log_key = channel.removesuffix(":events") + ":eventlog"
    script = redis.register_script(scripts.PUBLISH_EVENT)
    calls = [(script, [log_key], [100, p, 60_000, channel, "SPUBLISH"]) for p in payloads]
    replies = await pipelined(redis, calls)
    assert not [r for r in replies if isinstance(r, Exception)], replies


async def test_every_event_published_by_script_reaches_its_listener_on_every_shard(
    redis: RedisCluster,
) -> None:
    heard = Heard()
    async with listening(redis, heard) as channels:
        watched = spread(redis, 3)
        for channel in watched:
            assert await channels.subscribe(channel, heard.handler(channel))
        # One connection per shard that holds a channel of ours, with its own reader.
        assert len(channels._links) == 3

        payloads = [f"e{i}" for i in range(PER_CHANNEL)]
        for channel in watched:
            await publish_events(redis, channel, payloads)
        answer = keys.node_channel("here")
        for i in range(PER_CHANNEL):
            await channels.publish(answer, f"a{i}", "answer")

        for channel in watched:
            got = await heard.until(channel, PER_CHANNEL)
            # In order, each once: "<stream id> <payload>".
            assert [m.split(b" ", 1)[1] for m in got] == [p.encode() for p in payloads]
        assert await heard.until(answer, PER_CHANNEL) == [f"a{i}".encode() for i in range(20)]
        assert channels.received == {"event": PER_CHANNEL * (len(watched) + 1)}
        assert not heard.lost.is_set()


def node_client(port: int) -> Redis:
    # Given explicitly, redis-py does not read its package metadata (a blocking call).
    return Redis(port=port, driver_info=DriverInfo(name="redis-py", lib_version=redis_version))


async def _kill_connections(node_port: int) -> int:
    """Close, at the server, every pub/sub connection of a node (the cluster is this
    module's own)."""
    async with node_client(node_port) as node:
        killed = 0
        for client in await node.client_list(_type="pubsub"):
            killed += int(await node.client_kill_filter(_id=client["id"]))
        return killed


async def test_a_lost_shard_connection_is_subscribed_again_and_the_watchers_told(
    redis: RedisCluster,
) -> None:
    heard = Heard()
    async with listening(redis, heard) as channels:
        channel = spread(redis, 1)[0]
        assert await channels.subscribe(channel, heard.handler(channel))
        port = redis.get_node_from_key(channel).port

        assert await _kill_connections(int(port)) >= 1
        await heard.lost.wait()  # the owners catch up from their logs

        async def listened() -> bool:
            shard = redis.get_node_from_key(channel)
            found = await redis.pubsub_shardnumsub(channel, target_nodes=shard)
            return bool(found == [(channel.encode(), 1)])

        while not await listened():
            await asyncio.sleep(0.01)
        await publish_events(redis, channel, ["after"])
        assert [m.split(b" ", 1)[1] for m in await heard.until(channel, 1)] == [b"after"]


async def _move_slot(cluster: Topology, slot: int, to_port: int) -> None:
    """Give ``slot`` (holding no keys) to the master at ``to_port``, on every node."""
    ports = sorted((n.port for n in cluster.nodes), key=lambda p: p != to_port)
    async with node_client(to_port) as target:
        target_id = (await target.execute_command("CLUSTER", "MYID")).decode()
    # The new owner first, so that no node points at one that does not know it owns it.
    for port in ports:
        async with node_client(port) as node:
            await node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_a_channel_whose_slot_moves_is_followed_to_its_new_shard(
    cluster: Topology, redis: RedisCluster
) -> None:
    heard = Heard()
    async with listening(redis, heard) as channels:
        channel = spread(redis, 1)[0]
        assert await channels.subscribe(channel, heard.handler(channel))
        old = redis.get_node_from_key(channel)
        new = next(n for n in redis.get_primaries() if n.name != old.name)
        slot = redis.keyslot(channel)

        await _move_slot(cluster, slot, int(new.port))
        # The old shard drops our subscription (SUNSUBSCRIBE of its own); it is followed.
        await heard.lost.wait()

        async def followed() -> bool:
            found = await redis.pubsub_shardnumsub(channel, target_nodes=new)
            return bool(found == [(channel.encode(), 1)])

        while not await followed():
            await asyncio.sleep(0.01)
        await redis.nodes_manager.initialize()
        assert redis.get_node_from_key(channel).name == new.name
        await publish_events(redis, channel, ["moved"])
        assert [m.split(b" ", 1)[1] for m in await heard.until(channel, 1)] == [b"moved"]
