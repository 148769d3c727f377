"""The event bus: run events (``threadline.events``) from the runner to every watcher.

Each session's events get ids in order and stay in a short log, so a watcher that joins late
or reconnects (``Last-Event-ID``) replays what it missed, then follows live events; a
``Watch`` drops what it has seen already, so replay and live overlap without duplicates.

* ``LocalEvents``: one process. The log is in memory, the ids count up from 1, and a session's
  log goes as soon as a run of it ends with nobody watching: joiners after the end read the
  store (``api/streams.py``), so an ended log serves no one, while kept for ``RETENTION_S`` it
  held every session of the last ten minutes in memory, and the garbage collector walked them
  all (docs/performance.md, "Reference cycles and retained event logs").
* ``RedisEvents``: several processes. The log is a Redis stream per session (ids are stream
  ids) and each event is also published on the session's channel. A process listens to a
  session's channel only while it has a watcher of it (``Channels`` counts references):
  the first watcher subscribes, waits for Redis to confirm, then replays the log, so the
  two overlap rather than leave a gap, and the ``Watch`` drops the overlap. Events are
  published in batches by one task, so a run streaming many deltas costs few round trips.

Watching is best effort: a watcher too slow to keep up catches up from the log; a Redis
outage loses live events (a message's stream still ends with its answer, which comes from
the coordinator, not from here).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, cast
from uuid import UUID

from threadline.coordination import keys, scripts
from threadline.coordination.channels import Channels, Kind
from threadline.coordination.connection import Call, Client, pipelined
from threadline.coordination.leases import bounded
from threadline.events import RunEvent, event_key

log = logging.getLogger(__name__)

# Events a watcher may fall behind by before it catches up from the log instead.
WATCH_BUFFER = 1024
# Events kept per session; a reply longer than this in deltas cannot be replayed whole.
LOG_MAX = 10_000
# How long a session's log outlives its last event.
RETENTION_S = 600.0
# Events one publishing round trip carries at most.
PUBLISH_BATCH = 256
_STREAM_ID = re.compile(r"^\d+-\d+$")


class EventBus(Protocol):
    def emit(self, event: RunEvent) -> None: ...

    def watch(
        self, session_id: UUID, after: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[Watch]:
        """Follow a session's events from now on; with ``after``, first those after it
        still in the log ("0": all of them)."""

    async def replay(self, session_id: UUID, after: str) -> list[RunEvent]: ...


class Watch:
    """One watcher's view of a session: events in order, each once."""

    def __init__(self, bus: EventBus, session_id: UUID) -> None:
        self._bus = bus
        self.session_id = session_id
        # None: a wake-up (``interrupt``), not an event.
        self._live: asyncio.Queue[RunEvent | None] = asyncio.Queue(WATCH_BUFFER)
        self._backlog: deque[RunEvent] = deque()
        self._lagged = False
        self._seen: tuple[int, ...] = (-1,)
        self.last_id = ""

    def push(self, event: RunEvent) -> None:
        """Called by the bus for each live event; never blocks."""
        try:
            self._live.put_nowait(event)
        except asyncio.QueueFull:
            self._lagged = True  # ``next`` catches up from the log

    def interrupt(self) -> None:
        """Make a waiting ``next`` return None now (its owner has something else to do)."""
        with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes it anyway
            self._live.put_nowait(None)

    def lost(self) -> None:
        """Live events may have been missed (the subscription dropped): catch up from the log."""
        self._lagged = True

    async def catch_up(self, after: str) -> None:
        self._backlog.extend(await self._bus.replay(self.session_id, after))

    async def next(self, within: float | None = None) -> RunEvent | None:
        """The next event not seen yet; None if none came within ``within`` seconds."""
        while True:
            if self._lagged:
                self._lagged = False
                while not self._live.empty():
                    self._live.get_nowait()
                await self.catch_up(self.last_id or "0")
            if self._backlog:
                event: RunEvent | None = self._backlog.popleft()
            elif within == 0:
                if self._live.empty():
                    return None
                event = self._live.get_nowait()
            else:
                try:
                    async with asyncio.timeout(within):
                        event = await self._live.get()
                except TimeoutError:
                    return None
            if event is None:
                return None
            key = event_key(event.id)
            if key <= self._seen:
                continue
            self._seen, self.last_id = key, event.id
            return event


@dataclasses.dataclass(eq=False, slots=True)
class _Log:
    events: deque[RunEvent]
    watchers: set[Watch] = dataclasses.field(default_factory=set)
    touched: float = 0.0

    @property
    def ended(self) -> bool:
        """The last event ended a run: nothing of the session is live."""
        return bool(self.events) and self.events[-1].terminal


class LocalEvents:
    def __init__(self, *, log_max: int = LOG_MAX, retention_s: float = RETENTION_S) -> None:
        self._logs: OrderedDict[UUID, _Log] = OrderedDict()
        self._ids = itertools.count(1)
        self._log_max = log_max
        self._retention_s = retention_s

    def _log(self, session_id: UUID) -> _Log:
        entry = self._logs.get(session_id)
        if entry is None:
            entry = self._logs[session_id] = _Log(deque(maxlen=self._log_max))
        entry.touched = time.monotonic()
        self._logs.move_to_end(session_id)
        return entry

    @property
    def logs(self) -> int:
        """Sessions whose events are held here."""
        return len(self._logs)

    def emit(self, event: RunEvent) -> None:
        entry = self._log(event.session_id)
        event = dataclasses.replace(event, id=str(next(self._ids)))
        entry.events.append(event)
        for watcher in entry.watchers:
            watcher.push(event)
        self._drop_if_done(event.session_id, entry)
        self._evict()

    def _drop_if_done(self, session_id: UUID, entry: _Log) -> None:
        # A watcher that joins later finds the run ended in the store; a run that starts
        # later begins a new log, its ids still after these.
        if entry.ended and not entry.watchers and self._logs.get(session_id) is entry:
            del self._logs[session_id]

    def _evict(self) -> None:
        # Least recently touched first: stop at the first log still in use or still fresh.
        cutoff = time.monotonic() - self._retention_s
        while self._logs:
            session_id, entry = next(iter(self._logs.items()))
            if entry.watchers or entry.touched > cutoff:
                return
            del self._logs[session_id]

    @contextlib.asynccontextmanager
    async def watch(self, session_id: UUID, after: str | None = None) -> AsyncIterator[Watch]:
        entry = self._log(session_id)
        watcher = Watch(self, session_id)
        entry.watchers.add(watcher)
        try:
            if after is not None:
                await watcher.catch_up(after)
            yield watcher
        finally:
            entry.watchers.discard(watcher)
            self._drop_if_done(session_id, entry)

    async def replay(self, session_id: UUID, after: str) -> list[RunEvent]:
        entry = self._logs.get(session_id)
        if entry is None:
            return []
        start = event_key(after)
        return [e for e in entry.events if event_key(e.id) > start]

    def __len__(self) -> int:
        return sum(len(entry.watchers) for entry in self._logs.values())


class RedisEvents:
    def __init__(
        self,
        redis: Client,
        channels: Channels,
        *,
        timeout_s: float,
        log_max: int = LOG_MAX,
        retention_s: float = RETENTION_S,
    ) -> None:
        self._redis = redis
        self._channels = channels
        self._timeout_s = timeout_s
        self._log_max = log_max
        self._retention_ms = int(retention_s * 1000)
        self._publish = redis.register_script(scripts.PUBLISH_EVENT)
        self._outbox: asyncio.Queue[RunEvent] = asyncio.Queue()
        self._watchers: dict[UUID, set[Watch]] = {}
        channels.on_lost(self._lost)

    def emit(self, event: RunEvent) -> None:
        self._outbox.put_nowait(event)

    def __len__(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    @contextlib.asynccontextmanager
    async def watch(self, session_id: UUID, after: str | None = None) -> AsyncIterator[Watch]:
        watcher = Watch(self, session_id)
        self._watchers.setdefault(session_id, set()).add(watcher)
        channel = keys.events_channel(session_id)
        try:
            if not await self._channels.subscribe(channel, self._handler(session_id)):
                # Not listening yet (Redis is slow or away): live events may be missed until
                # the subscription is back, so the watcher reads the log instead.
                watcher.lost()
            if after is not None:
                await watcher.catch_up(after)
            yield watcher
        finally:
            watchers = self._watchers.get(session_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[session_id]
            await self._channels.unsubscribe(channel)

    async def replay(self, session_id: UUID, after: str) -> list[RunEvent]:
        start = f"({after}" if _STREAM_ID.match(after) else "-"
        async with bounded(self._timeout_s):
            entries = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]",
                await self._redis.xrange(keys.events_log(session_id), min=start, max="+"),
            )
        return [RunEvent.from_json(fields[b"e"], raw_id.decode()) for raw_id, fields in entries]

    # -- background loops, owned by the coordinator ---------------------------------------

    async def publish_forever(self) -> None:
        """Send emitted events to Redis in order, as many per round trip as are waiting."""
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancel arrived inside a Redis call that did not pass it on (seen with a
                # pipeline cancelled mid-flight at shutdown): stop as asked.
                raise asyncio.CancelledError
            batch = [await self._outbox.get()]
            while len(batch) < PUBLISH_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            calls: list[Call] = [
                (self._publish, self._keys(event), self._args(event)) for event in batch
            ]
            try:
                # In any Redis mode (a cluster pipeline takes no script object); a session's
                # events go to one node, in order.
                async with bounded(self._timeout_s):
                    replies = await pipelined(self._redis, calls)
                failed = [reply for reply in replies if isinstance(reply, Exception)]
                if failed:
                    raise failed[0]
                self._channels.count_published("event", len(batch))
            except Exception as exc:
                log.warning("could not publish %d run events: %s", len(batch), exc)

    @staticmethod
    def _keys(event: RunEvent) -> list[str]:
        return [keys.events_log(event.session_id)]

    def _args(self, event: RunEvent) -> list[Any]:
        return [
            self._log_max,
            event.to_json(),
            self._retention_ms,
            keys.events_channel(event.session_id),
            self._channels.publish_command,
        ]

    def _handler(self, session_id: UUID) -> Callable[[bytes], Kind]:
        def deliver(data: bytes) -> Kind:
            watchers = self._watchers.get(session_id)
            if watchers:
                raw_id, _, payload = data.partition(b" ")
                event = RunEvent.from_json(payload, raw_id.decode())
                for watcher in list(watchers):
                    watcher.push(event)
            return "event"

        return deliver

    def _lost(self) -> None:
        """The subscription dropped: every watcher catches up from its session's log."""
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.lost()
