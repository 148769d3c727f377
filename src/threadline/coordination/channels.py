"""``Channels``: the one owner of this process's Redis pub/sub, what it sends and what it hears.

A process listens to two kinds of channel, never by pattern, so that it receives only what
concerns it:

* its own node channel, for as long as it runs: nudges for the sessions it owns, and the
  answers its callers wait for (the process that stores a message names itself in it, so
  the owner publishes the answer there alone);
* a session's event channel, only while it has a watcher of that session (a stream, a
  joiner, a cancel waiting for the run to end): ``subscribe`` and ``unsubscribe`` count
  references, the first watcher subscribes and the last one unsubscribes.

All of it on one connection. ``sharded`` (for Redis Cluster) swaps SUBSCRIBE/PUBLISH for
sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7.0): a message goes to the shard that owns its
channel's slot instead of to every node of the cluster; ``publish_command`` tells scripts
which command to use.

``subscribe`` returns once Redis has confirmed the subscription (the listen loop reads the
confirmation), so a watcher that replays the session's log afterwards misses nothing that was
published in between. After a lost connection every channel is subscribed again and the
``on_lost`` callbacks tell their owners to catch up (run events from their log; a caller
waiting for an answer has its own net: the watchdog reads the store).

``published`` and ``received`` count messages by kind, for the scale model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, cast

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from threadline import metrics
from threadline.coordination.connection import Client
from threadline.coordination.leases import bounded

log = logging.getLogger(__name__)

Kind = Literal["answer", "event", "nudge"]
# Called with each message's data; says what kind it was.
Handler = Callable[[bytes], Kind]

# Redis Cluster, sharded: how long one shard's connection is polled before the next one's.
CLUSTER_POLL_S = 0.05

_CONFIRMATIONS = {"subscribe", "ssubscribe"}
_MESSAGES = {"message", "smessage"}


def publish_command(sharded: bool) -> str:
    return "SPUBLISH" if sharded else "PUBLISH"


class Channels:
    def __init__(
        self, redis: Client, listening: Client, *, sharded: bool, timeout_s: float
    ) -> None:
        """``redis`` publishes; ``listening`` gives the subscription its connection."""
        self.sharded = sharded
        self.publish_command = publish_command(sharded)
        self._redis = redis
        self._timeout_s = timeout_s
        # Confirmations are read, not ignored: ``subscribe`` waits for its own.
        self._pubsub: PubSub = listening.pubsub(ignore_subscribe_messages=False)
        self._handlers: dict[bytes, Handler] = {}
        self._refs: Counter[bytes] = Counter()
        # Per channel: set once Redis confirmed the subscription that is current.
        self._ready: dict[bytes, asyncio.Event] = {}
        # Per channel: subscribe commands sent whose confirmation has not come yet. A channel
        # left and joined again quickly has two in flight; only the last one makes it ready.
        self._unconfirmed: Counter[bytes] = Counter()
        self._on_lost: list[Callable[[], None]] = []
        self.published: Counter[Kind] = Counter()
        self.received: Counter[Kind] = Counter()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after the connection was lost (messages may have been missed)."""
        self._on_lost.append(callback)

    # -- listening ------------------------------------------------------------------------

    async def open(self, channel: str, handler: Handler) -> None:
        """Listen to the process's first channel, before the listen loop runs: this reads
        Redis's confirmation itself. ``CoordinatorUnavailable`` if Redis does not answer."""
        name = channel.encode()
        self._refs[name] += 1
        self._handlers[name] = handler
        ready = self._ready[name] = asyncio.Event()
        self._unconfirmed[name] += 1
        async with bounded(self._timeout_s):
            await self._send_subscribe(name)
            while not ready.is_set():
                message = await self._next(self._timeout_s)
                if message is not None:
                    self._dispatch(message)

    async def subscribe(self, channel: str, handler: Handler) -> bool:
        """Listen to ``channel`` (one reference more, if listened to already). True once
        Redis confirmed it; False if it did not within the Redis timeout (the listen loop
        subscribes again once Redis answers, and tells ``on_lost``)."""
        name = channel.encode()
        self._refs[name] += 1
        if self._refs[name] == 1:
            self._handlers[name] = handler
            self._ready[name] = asyncio.Event()
            self._unconfirmed[name] += 1
            try:
                await self._send_subscribe(name)
            except (RedisError, OSError) as exc:
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
        # Best effort: a channel left subscribed after a failure (redis-py may even subscribe
        # it again when it reconnects) only costs stray messages, which find no handler.
        with contextlib.suppress(RedisError, OSError):
            if self.sharded:
                await self._pubsub.sunsubscribe(name)
            else:
                await self._pubsub.unsubscribe(name)

    def listening(self) -> set[str]:
        """The channels listened to now."""
        return {name.decode() for name in self._handlers}

    async def listen(self) -> None:
        """Hand what arrives to each channel's handler, forever; subscribe again after a
        lost connection."""
        while True:
            try:
                message = await self._next(1.0)
            except (RedisError, OSError) as exc:
                log.warning("Redis subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(RedisError, OSError):
                    await self._resubscribe()
                continue
            if message is not None:
                self._dispatch(message)

    async def _next(self, wait_s: float) -> dict[str, Any] | None:
        sharded_read = getattr(self._pubsub, "get_sharded_message", None)
        if self.sharded and sharded_read is not None:
            # Redis Cluster: redis-py keeps one connection per shard that holds a channel of
            # ours and polls them in turn, each for the timeout given, so the timeout is
            # short: a message on the last shard must not wait behind the others' polls.
            found = await sharded_read(ignore_subscribe_messages=False, timeout=CLUSTER_POLL_S)
            return cast("dict[str, Any] | None", found)
        return cast("dict[str, Any] | None", await self._pubsub.get_message(timeout=wait_s))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, name = str(message["type"]), message["channel"]
        if kind in _CONFIRMATIONS:
            self._confirmed(name)
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

    async def _resubscribe(self) -> None:
        # Confirmations of the old connection never come: count those of the new one.
        self._unconfirmed.clear()
        names = list(self._handlers)
        for name in names:
            self._unconfirmed[name] = 1
            # A watcher arriving meanwhile waits for the new connection's confirmation.
            self._ready[name].clear()
        if names:
            await self._send_subscribe(*names)
        for callback in self._on_lost:
            callback()

    async def _send_subscribe(self, *names: bytes) -> None:
        if self.sharded:
            await self._pubsub.ssubscribe(*names)
        else:
            await self._pubsub.subscribe(*names)

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
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
