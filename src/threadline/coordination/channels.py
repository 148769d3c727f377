"""``Channels``: the one owner of this process's Redis pub/sub, what it sends and what it hears.

A process listens to two kinds of channel, never by pattern, so that it receives only what
concerns it:

* its own node channel, for as long as it runs: nudges for the sessions it owns, and the
  answers its callers wait for (the process that stores a message names itself in it, so
  the owner publishes the answer there alone);
* a session's event channel, only while it has a watcher of that session (a stream, a
  joiner, a cancel waiting for the run to end): ``subscribe`` and ``unsubscribe`` count
  references, the first watcher subscribes and the last one unsubscribes.

``sharded`` (for Redis Cluster) swaps SUBSCRIBE/PUBLISH for sharded pub/sub
(SSUBSCRIBE/SPUBLISH, Redis >= 7.0): a message goes to the shard that owns its channel's slot
instead of to every node of the cluster; ``publish_command`` tells scripts which command to
use. A channel is heard on a connection to the shard that owns it, so in a cluster there is one
``_Link`` (a connection and the reader that blocks on it) per shard that holds a channel of
ours; otherwise one link carries every channel. (redis-py's own cluster pub/sub polls its
per-shard connections in turn, with a short timeout each, and lost messages that way: a
cluster test saw a watcher receive 1 of a session's 6 events.)

``subscribe`` returns once Redis has confirmed the subscription (the reader reads the
confirmation), so a watcher that replays the session's log afterwards misses nothing that was
published in between. After a lost connection, or when a cluster shard gives up a channel (its
slot moved: Redis says so with an SUNSUBSCRIBE of its own), the channels are subscribed again
where they now live and the ``on_lost`` callbacks tell their owners to catch up (run events
from their log; a caller waiting for an answer has its own net: the watchdog reads the store).

``published`` and ``received`` count messages by kind, for the scale model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster

from threadline import metrics
from threadline.coordination.connection import FAILURES, Client
from threadline.coordination.leases import bounded

log = logging.getLogger(__name__)

Kind = Literal["answer", "event", "nudge"]
# Called with each message's data; says what kind it was.
Handler = Callable[[bytes], Kind]

# How long a reader waits for a message before it looks again (and redis-py checks the
# connection's health): it wakes on a message at once, so this only bounds idle waits.
READ_WAIT_S = 1.0
# After a lost connection, before subscribing again.
RECONNECT_WAIT_S = 0.5

_CONFIRMATIONS = {"subscribe", "ssubscribe"}
_LEFT = {"unsubscribe", "sunsubscribe"}
_MESSAGES = {"message", "smessage"}


def publish_command(sharded: bool) -> str:
    return "SPUBLISH" if sharded else "PUBLISH"


class _Link:
    """One pub/sub connection and the channels subscribed on it. ``broken`` once it failed:
    its reader opens a new connection and subscribes its channels again. ``client`` is set
    when the link made its own client (a cluster shard's), which it then closes."""

    def __init__(self, name: str, factory: Callable[[], PubSub], client: Redis | None) -> None:
        self.name = name
        self._factory = factory
        self.pubsub = factory()
        self.client = client
        self.channels: set[bytes] = set()
        self.reading = False
        # Set once a subscribe was tried: before, the pub/sub has no connection to read.
        self.tried = False
        self.broken = False

    async def reset(self) -> None:
        """A new connection (opened by the next subscribe), the old one closed."""
        old, self.pubsub = self.pubsub, self._factory()
        with contextlib.suppress(*FAILURES):
            await old.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        with contextlib.suppress(*FAILURES):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        if self.client is not None:
            with contextlib.suppress(*FAILURES):
                await self.client.aclose()


class Channels:
    def __init__(
        self, redis: Client, listening: Client, *, sharded: bool, timeout_s: float
    ) -> None:
        """``redis`` publishes; ``listening`` gives the subscriptions their connections."""
        self.sharded = sharded
        self.publish_command = publish_command(sharded)
        self._redis = redis
        self._listening = listening
        self._timeout_s = timeout_s
        self._links: dict[str, _Link] = {}
        self._link_of: dict[bytes, _Link] = {}
        # Set while ``listen`` runs: it owns the readers, one per link.
        self._readers: asyncio.TaskGroup | None = None
        self._handlers: dict[bytes, Handler] = {}
        self._refs: Counter[bytes] = Counter()
        # Per channel: set once Redis confirmed the subscription that is current.
        self._ready: dict[bytes, asyncio.Event] = {}
        # Per channel: subscribe commands sent whose confirmation has not come yet. A channel
        # left and joined again quickly has two in flight; only the last one makes it ready.
        self._unconfirmed: Counter[bytes] = Counter()
        # Per channel: unsubscribes we sent, unconfirmed; any other is Redis dropping it.
        self._leaving: Counter[bytes] = Counter()
        self._on_lost: list[Callable[[], None]] = []
        self.published: Counter[Kind] = Counter()
        self.received: Counter[Kind] = Counter()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after the connection was lost (messages may have been missed)."""
        self._on_lost.append(callback)

    # -- listening ------------------------------------------------------------------------

    async def open(self, channel: str, handler: Handler) -> None:
        """Listen to the process's first channel, before ``listen`` runs: this reads Redis's
        confirmation itself. ``CoordinatorUnavailable`` if Redis does not answer."""
        name = channel.encode()
        self._refs[name] += 1
        self._handlers[name] = handler
        ready = self._ready[name] = asyncio.Event()
        self._unconfirmed[name] += 1
        async with bounded(self._timeout_s):
            link = await self._send_subscribe(name)
            while not ready.is_set():
                message = await link.pubsub.get_message(timeout=self._timeout_s)
                if message is not None:
                    await self._dispatch(link, message)

    async def subscribe(self, channel: str, handler: Handler) -> bool:
        """Listen to ``channel`` (one reference more, if listened to already). True once
        Redis confirmed it; False if it did not within the Redis timeout (its reader
        subscribes again once Redis answers, and tells ``on_lost``)."""
        name = channel.encode()
        self._refs[name] += 1
        if self._refs[name] == 1:
            self._handlers[name] = handler
            self._ready[name] = asyncio.Event()
            self._unconfirmed[name] += 1
            try:
                await self._send_subscribe(name)
            except FAILURES as exc:
                log.warning("could not subscribe to %s: %s", channel, exc)
                return False
        ready = self._ready[name]
        try:
            async with asyncio.timeout(self._timeout_s):
                await ready.wait()
        except TimeoutError:
            return False
        return True

    async def unsubscribe(self, channel: str) -> None:
        """Drop one reference to ``channel``; the last one stops listening to it."""
        name = channel.encode()
        if self._refs[name] <= 0:
            return
        self._refs[name] -= 1
        if self._refs[name] > 0:
            return
        del self._refs[name]
        self._handlers.pop(name, None)
        self._ready.pop(name, None)
        link = self._link_of.pop(name, None)
        if link is None:
            return
        link.channels.discard(name)
        # Best effort: a channel left subscribed after a failure (redis-py may even subscribe
        # it again when it reconnects) only costs stray messages, which find no handler.
        self._leaving[name] += 1
        try:
            if self.sharded:
                await link.pubsub.sunsubscribe(name)
            else:
                await link.pubsub.unsubscribe(name)
        except FAILURES:
            self._leaving[name] -= 1  # its confirmation never comes

    def listening(self) -> set[str]:
        """The channels listened to now."""
        return {name.decode() for name in self._handlers}

    async def listen(self) -> None:
        """Hand what arrives on every link to each channel's handler, until cancelled; one
        reader per link, for links opened before and after this starts."""
        async with asyncio.TaskGroup() as readers:
            self._readers = readers
            try:
                for link in self._links.values():
                    self._start_reader(link)
                await asyncio.Future()  # the readers run until this is cancelled
            finally:
                self._readers = None

    def _start_reader(self, link: _Link) -> None:
        if self._readers is not None and link.tried and not link.reading:
            link.reading = True
            self._readers.create_task(self._read(link), name=f"pubsub {link.name or 'redis'}")

    async def _read(self, link: _Link) -> None:
        while True:
            try:
                if link.broken:
                    await self._renew(link)
                    if not link.channels and link.name:
                        # A cluster shard that holds none of our channels now (its slots
                        # moved, or it failed over): let it go.
                        await self._drop(link)
                        return
                message = await link.pubsub.get_message(timeout=READ_WAIT_S)
                if message is not None:
                    await self._dispatch(link, message)
            except FAILURES as exc:
                if not link.broken:
                    log.warning("Redis subscription lost (%s); subscribing again", exc)
                link.broken = True
                await asyncio.sleep(RECONNECT_WAIT_S)
            except Exception:
                # Never let one link's reader stop them all (the task group would).
                log.exception("pub/sub reader failed; subscribing again")
                link.broken = True
                await asyncio.sleep(RECONNECT_WAIT_S)

    async def _renew(self, link: _Link) -> None:
        """Subscribe a broken link's channels again, on a new connection, or on the shard
        that owns each now; then the owners of watchers catch up from their logs."""
        if isinstance(self._listening, RedisCluster):
            await self._listening.nodes_manager.initialize()
        await link.reset()
        for name in list(link.channels):
            await self._send_subscribe(name, again=True)
        link.broken = False
        self._tell_lost()

    def _tell_lost(self) -> None:
        for callback in self._on_lost:
            callback()

    async def _drop(self, link: _Link) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        await link.aclose()

    async def _dispatch(self, link: _Link, message: dict[str, Any]) -> None:
        kind, name = str(message["type"]), message["channel"]
        if kind in _CONFIRMATIONS:
            self._confirmed(name)
        elif kind in _LEFT:
            if self._leaving[name] > 0:
                self._leaving[name] -= 1
            elif self._link_of.get(name) is link:
                # Not ours: Redis dropped it (a cluster shard gave its slot away). Follow it.
                log.warning("Redis dropped the subscription to %r; subscribing again", name)
                link.channels.discard(name)
                await self._send_subscribe(name, again=True)
                self._tell_lost()
            if self._leaving[name] <= 0:
                del self._leaving[name]
        elif kind in _MESSAGES:
            handler = self._handlers.get(name)
            if handler is None:
                return  # left since (its unsubscribe was still on its way)
            try:
                self._count_received(handler(message["data"]))
            except Exception:
                log.exception("bad message on %r", name)

    def _confirmed(self, name: bytes) -> None:
        if self._unconfirmed[name] > 0:
            self._unconfirmed[name] -= 1
        if self._unconfirmed[name] <= 0:
            del self._unconfirmed[name]
            ready = self._ready.get(name)
            if ready is not None:
                ready.set()

    async def _send_subscribe(self, name: bytes, *, again: bool = False) -> _Link:
        """Subscribe ``name`` on the link that hears it. The channel joins that link first:
        should the command fail, the link is broken and its reader subscribes it again.
        ``again``: a subscription being renewed, whose old confirmations never come."""
        link = self._link_for(name)
        old = self._link_of.get(name)
        if old is not None and old is not link:
            old.channels.discard(name)
        link.channels.add(name)
        self._link_of[name] = link
        if again:
            self._unconfirmed[name] = 1
            ready = self._ready.get(name)
            if ready is not None:
                ready.clear()  # a watcher arriving meanwhile waits for it
        try:
            if self.sharded:
                await link.pubsub.ssubscribe(name)
            else:
                await link.pubsub.subscribe(name)
        except FAILURES:
            link.broken = True
            raise
        finally:
            # Only now: a reader needs the connection the first subscribe opens (or, if
            # that failed, to open one).
            link.tried = True
            self._start_reader(link)
        return link

    def _link_for(self, name: bytes) -> _Link:
        """The link that hears ``name``: a cluster shard's own (sharded channels live on the
        shard that owns their slot), else the one link."""
        if not (self.sharded and isinstance(self._listening, RedisCluster)):
            link = self._links.get("")
            if link is None:
                # Confirmations are read, not ignored: ``subscribe`` waits for its own.
                listening = self._listening
                link = self._links[""] = _Link(
                    "", lambda: listening.pubsub(ignore_subscribe_messages=False), None
                )
            return link
        node = self._listening.get_node_from_key(name.decode())
        assert node is not None  # the slot map covers every slot once initialised
        link = self._links.get(node.name)
        if link is None:
            client = Redis.from_pool(
                ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            )
            link = self._links[node.name] = _Link(
                node.name, lambda: client.pubsub(ignore_subscribe_messages=False), client
            )
        return link

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, channel: str, payload: str, kind: Kind) -> None:
        """Publish one message; ``CoordinatorUnavailable`` if Redis does not take it."""
        async with bounded(self._timeout_s):
            if self.sharded:
                await self._redis.spublish(channel, payload)
            else:
                await self._redis.publish(channel, payload)
        self.count_published(kind)

    def count_published(self, kind: Kind, count: int = 1) -> None:
        """Count messages published elsewhere (by a script)."""
        self.published[kind] += count
        metrics.PUBSUB_PUBLISHED.labels(kind).inc(count)

    def _count_received(self, kind: Kind) -> None:
        self.received[kind] += 1
        metrics.PUBSUB_RECEIVED.labels(kind).inc()

    async def aclose(self) -> None:
        for link in self._links.values():
            await link.aclose()
        self._links.clear()
