"""Coordination across processes and hosts through Redis; PostgreSQL stays the source of truth.

Each session has at most one *owner* process, recorded in a Redis lease (``Leases``) that the
owner renews. The owner runs the session's turns in its local ``TurnQueue``; the other
processes only store messages, nudge the owner and wait for the answer (``Mailbox``)::

    caller ─▶ process B                     Redis                       process A (owner)
              CLAIM lease ────────────────▶ held by A
              INSERT message (PostgreSQL)
              NUDGE: mark dirty, ─────────▶ PUBLISH node:A ───────────▶ adopt(message):
                     publish to A                                       cancel run, merge
              wait for answer ◀─────────── PUBLISH node:B ◀──────────── run commits (fenced)

The message names the process that stored it (``RunOptions.reply_to``), so its answer goes to
that process alone, whoever runs it (the owner, or a process that took the session over); a
repeat of its idempotency key at a third process names that process in its nudge. Pub/sub is
sharded (SPUBLISH/SSUBSCRIBE) when ``sharded`` is set, for Redis Cluster (``channels.py``).

This module is policy only:

* A free lease is taken by whoever needs it: the process a message arrives at, or a process
  whose callers wait on a session whose owner died (the watchdog), or any process that finds
  an orphaned session (lease expired without a release). Taking a session over (``take_over``)
  adopts every unanswered message in the store with the options stored with it, and lets the
  lease go again in ``finally`` when nothing is left to run, whatever failed.
* The owner releases the lease when its queue goes idle; a dirty session (a message arrived
  meanwhile) is looked at again first.
* Fencing is PostgreSQL's: opening a run makes it the session's current run and a commit only
  lands for the current run, so an owner that lost its lease (a pause, a partition) cannot
  store a reply once a new owner has opened a run. A run that handed off (``Handoff``) is
  answered from the store.
* Redis errors surface as ``CoordinatorUnavailable`` (503) within ``REDIS_TIMEOUT_S``. The
  lease is claimed before anything is stored, so a request failing at that step stored
  nothing; one failing at the nudge, after its insert, gets 503 although its message is
  stored, and ``_recover`` has it answered once Redis is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from threadline import metrics
from threadline.agents import AgentRegistry
from threadline.config import Settings
from threadline.coordination import replay
from threadline.coordination.answers import stored_answer
from threadline.coordination.base import OnStored, TurnRequest
from threadline.coordination.channels import Channels
from threadline.coordination.connection import Client, open_client, ready
from threadline.coordination.events import RedisEvents
from threadline.coordination.leases import Leases, bounded
from threadline.coordination.local import (
    adopt_unanswered,
    build_queue,
    storing,
    traced,
    user_message,
)
from threadline.coordination.mailbox import Mailbox
from threadline.errors import (
    CoordinatorUnavailable,
    Handoff,
    QueueFull,
    RunFailed,
    SessionBusy,
    ShuttingDown,
    StoreUnavailable,
    ThreadlineError,
)
from threadline.queue.job import Answer, RunOptions
from threadline.runner import until_the_store_answers
from threadline.store import DuplicateMessage, Message, Store

if TYPE_CHECKING:
    from threadline.tracing import Tracing

log = logging.getLogger(__name__)

# Orphaned sessions one read of one bucket of the orphan index returns at most: a bound on
# a reply's size, far above what a bucket holds due at once (a pass reads BUCKETS_PER_TICK).
ORPHANS_PER_BUCKET = 200
# Sessions one watchdog pass looks at, or takes over, at once (each holds a store connection
# while it reads the session's messages).
WATCH_CONCURRENCY = 8
# Connections for run events: the subscription, the publisher, and replays for joiners.
EVENT_CONNECTIONS = 8


def next_due(last: float, interval: float, now: float) -> float:
    """When a periodic step starts next: ``interval`` after its last start, not after its
    end, so that a watchdog pass comes every ``LEASE_TTL_MS / 4`` while passes take less
    than that (the takeover bound counts passes: docs/architecture.md, "Watchdog scan"). A
    step that overran the interval (Redis timing out, say) is followed by a quarter of one:
    no burst to catch up, and no back-to-back passes hammering a Redis that is down."""
    due = last + interval
    return due if now <= due else now + interval / 4


class RedisCoordinator:
    def __init__(
        self,
        redis: Client,
        renewal: Client,
        watching: Client,
        store: Store,
        registry: AgentRegistry,
        settings: Settings,
        on_delivery: Callable[[], None] | None = None,
        tracing: Tracing | None = None,
        *,
        sharded: bool = False,
    ) -> None:
        self._redis = redis
        self._tracing = tracing
        self._renewal = renewal
        self._watching = watching
        self._store = store
        self._registry = registry
        self._settings = settings
        self.node = uuid.uuid4().hex
        ttl_ms = settings.lease_ttl_ms
        self._ttl_s = ttl_ms / 1000
        # A dirty mark must outlive any owner that could still look at it: one that is in
        # the middle of its longest possible run when the mark is set.
        run_ms = settings.model_timeout_s * 1000 + settings.merge_max_wait_ms
        dirty_ttl_ms = int(max(ttl_ms * 10, 2 * run_ms + ttl_ms))
        # One pub/sub connection, on the event pool (it holds the connection for good).
        self._channels = Channels(
            redis, watching, sharded=sharded, timeout_s=settings.redis_timeout_s
        )
        self._leases = Leases(
            redis,
            renewal,
            self.node,
            self._channels,
            ttl_ms=ttl_ms,
            dirty_ttl_ms=dirty_ttl_ms,
            timeout_s=settings.redis_timeout_s,
        )
        self._mailbox = Mailbox(self._channels, store, self.node)
        self.events = RedisEvents(watching, self._channels, timeout_s=settings.redis_timeout_s)
        self.queue = build_queue(
            store, registry, settings, self.events, self._on_idle, on_delivery, tracing
        )
        self._releasing: dict[UUID, asyncio.Task[None]] = {}
        self._recovering: dict[UUID, asyncio.Task[None]] = {}
        # Answers to publish once their run ends: (message, process where its caller waits).
        self._publishing: set[tuple[UUID, str | None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._repeats = 0  # callers of a repeated idempotency key waiting for its answer

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        store: Store,
        registry: AgentRegistry,
        on_delivery: Callable[[], None] | None = None,
        tracing: Tracing | None = None,
        *,
        sharded: bool | None = None,
    ) -> RedisCoordinator:
        """``sharded``: sharded pub/sub, which Redis Cluster needs (and Redis >= 7.0 has);
        by default in cluster mode only (tests also run it on a standalone Redis)."""
        if sharded is None:
            sharded = settings.redis_mode == "cluster"
        redis = open_client(settings, settings.redis_max_connections)
        # Renewals on a connection of their own: never behind requests queued for the pool.
        renewal = open_client(settings, 2)
        # Run events (streams, joiners) on a pool of their own too: a subscription holds a
        # connection for good, and many joiners replaying must not starve the requests.
        watching = open_client(settings, EVENT_CONNECTIONS)
        self = cls(
            redis,
            renewal,
            watching,
            store,
            registry,
            settings,
            on_delivery,
            tracing,
            sharded=sharded,
        )
        try:
            async with bounded(settings.redis_timeout_s * 2):
                for client in (redis, renewal, watching):
                    await ready(client)
                await self._mailbox.open(self._on_nudge)
        except CoordinatorUnavailable:
            await redis.aclose()
            await renewal.aclose()
            await watching.aclose()
            raise
        self._spawn(self._channels.listen())
        self._spawn(self.events.publish_forever())
        self._spawn(self._every(self._ttl_s / 3, self._renew))
        self._spawn(self._every(max(0.2, self._ttl_s / 4), self._watch))
        return self

    # -- submitting --------------------------------------------------------------------

    async def submit(self, request: TurnRequest, on_stored: OnStored | None = None) -> Answer:
        with metrics.CALLERS_WAITING.track_inprogress():
            return await self._submit(request, on_stored)

    async def _submit(self, request: TurnRequest, on_stored: OnStored | None) -> Answer:
        if self._closing:
            raise ShuttingDown("server is shutting down; not accepting messages")
        # Named in the stored message: whoever runs it publishes its answer here alone.
        request = dataclasses.replace(traced(request, self._tracing), reply_to=self.node)
        loaded = await self._registry.get(request.agent)
        first = await replay.original(self._store, request)
        if first is not None:
            return await self._replay(request, first, on_stored)
        token = await self._leases.claim_to_store(request.session_id)
        try:
            if token is None:
                try:
                    return await self._submit_local(request, loaded.model_name, on_stored)
                except StoreUnavailable:
                    # The insert may have committed with its reply lost: see ``_recover``.
                    self._recover(request.session_id)
                    raise
            return await self._submit_remote(request, token, on_stored)
        except DuplicateMessage as duplicate:  # a request with the same key stored first
            return await self._replay(request, duplicate.existing, on_stored, token)

    async def _submit_local(
        self, request: TurnRequest, model_name: str, on_stored: OnStored | None
    ) -> Answer:
        sid = request.session_id
        ids: list[UUID] = []

        def stored(message_id: UUID) -> None:
            ids.append(message_id)
            # Should this process lose the session mid-run, the answer comes from the new
            # owner, addressed by message id.
            self._mailbox.expect(sid, message_id)
            if on_stored is not None:
                on_stored(message_id)

        accept = storing(self._store, request, model_name, stored)
        try:
            answer = await self.queue.submit(sid, request.strategy, accept, request.options)
            if isinstance(answer.outcome.error, Handoff):
                return await self._mailbox.wait(sid, answer.message_id)
            return answer
        finally:
            for message_id in ids:
                self._mailbox.forget(message_id)

    async def _submit_remote(
        self, request: TurnRequest, token: str, on_stored: OnStored | None
    ) -> Answer:
        sid = request.session_id
        if request.strategy == "reject":
            raise SessionBusy(sid, None)
        backlog = await self._store.unanswered(sid)
        if len(backlog) >= self._settings.session_queue_max:
            raise QueueFull(sid, self._settings.session_queue_max)
        # Insert and nudge as one unit that a caller who disconnects cannot cut in half: a
        # message stored but never announced would wait for the session's next message.
        message_id: UUID = await asyncio.shield(self._spawn(self._store_and_nudge(request, token)))
        if on_stored is not None:
            on_stored(message_id)
        return await self._mailbox.wait(sid, message_id)

    async def _store_and_nudge(self, request: TurnRequest, token: str) -> UUID:
        sid = request.session_id
        try:
            stored, _ = await self._store.add_user_message(sid, user_message(request))
        except StoreUnavailable:
            self._recover(sid)  # the insert may have committed with its reply lost
            raise
        payload = {
            "session_id": str(sid),
            "message_id": str(stored.id),
            "seq": stored.seq,
            "strategy": request.strategy,
            "options": request.options.to_json(),
        }
        try:
            took = await self._leases.nudge(sid, payload, token)
        except CoordinatorUnavailable:
            self._recover(sid)  # stored, but its owner was not told
            raise
        if took:
            # The owner released the session between our two calls: it is ours now.
            await self.take_over(sid)
        return stored.id

    # -- requests repeating an idempotency key -----------------------------------------

    async def _replay(
        self,
        request: TurnRequest,
        first: Message,
        on_stored: OnStored | None,
        token: str | None = None,
    ) -> Answer:
        """Answer a request repeating an idempotency key with the answer of ``first``.

        ``token``: the claim that listed this request's insert in flight (it lost the race
        to store the key), which the nudge in ``_answer_of`` unlists.
        """
        replay.check_same_body(request, first)
        # Listening before anything can publish the answer, so that no publication is missed.
        self._mailbox.expect(first.session_id, first.id)
        self._repeats += 1
        try:
            return replay.replayed(await self._answer_of(request, first, token, on_stored))
        finally:
            self._repeats -= 1
            self._mailbox.forget(first.id)

    async def _answer_of(
        self,
        request: TurnRequest,
        first: Message,
        token: str | None,
        on_stored: OnStored | None,
    ) -> Answer:
        sid = first.session_id
        found: Answer | None = None
        future = await self.queue.follow(sid, first.id)
        if future is None and token is None:
            found = await stored_answer(self._store, first.id)
        if future is None and found is None:
            # Our queue does not hold it. Its owner publishes the answers of the messages it
            # adopted only, so the nudge names the message: the owner follows it (adopting
            # it if it has not yet) and publishes its answer. A session nobody owned is
            # ours now: answer every unanswered message, as a takeover does.
            nudge = {
                "session_id": str(sid),
                "follow": str(first.id),
                "seq": first.seq,
                # Where the repeat's caller waits, which may not be where the first did.
                "reply_to": self.node,
                "options": replay.options_of(request, first).to_json(),
            }
            if await self._leases.nudge(sid, nudge, token):
                await self.take_over(sid)
                future = await self.queue.follow(sid, first.id)
            elif self._leases.holds(sid):  # the owner is us: the nudge went nowhere
                options = replay.options_of(request, first)
                future = await self._follow_here(sid, first.id, first.seq, options, self.node)
        # Told only now that the message is on its way to an answer: a caller that stops
        # waiting once told (a background request) leaves nothing half done.
        if on_stored is not None:
            on_stored(first.id)
        if found is not None:
            return found
        if future is not None:
            answer = await asyncio.shield(future)
            if not isinstance(answer.outcome.error, Handoff):
                return answer
        return await self._mailbox.wait(sid, first.id)

    async def _follow_here(
        self, sid: UUID, message_id: UUID, seq: int, options: RunOptions, reply_to: str | None
    ) -> asyncio.Future[Answer]:
        """The answer of a message of a session we own, adopting it if our queue does not
        hold it (its nudge is on its way, or never comes); published to ``reply_to`` when
        done."""
        future = await self.queue.follow(sid, message_id)
        if future is None:
            future = self.queue.adopt(sid, message_id, seq, "enqueue", options)
        self._publish_when_done(message_id, future, reply_to)
        return future

    def _recover(self, sid: UUID) -> None:
        """A message of ``sid`` may be stored that no run will answer: its caller heard 503
        after the insert (its reply lost, or the nudge failed), or the process that stored it
        died before its nudge (the watchdog's ``stranded``). Once the store and Redis
        answer again, make whoever owns the session look at the store: a nudge without a
        message marks the session dirty and asks its owner to take over; a free lease is
        ours to take."""
        if sid in self._recovering or self._closing:
            return
        task = self._spawn(self._recovery(sid))
        self._recovering[sid] = task
        task.add_done_callback(lambda _: self._recovering.pop(sid, None))

    async def _recovery(self, sid: UUID) -> None:
        recheck = {"session_id": str(sid)}
        async for attempt in until_the_store_answers(CoordinatorUnavailable):
            with attempt:
                if await self._leases.nudge(sid, recheck) or self._leases.holds(sid):
                    await self.take_over(sid)

    # -- owning sessions ---------------------------------------------------------------

    async def take_over(self, sid: UUID) -> None:
        """Run every unanswered message of a session whose lease we just took, and answer
        callers here from the store; let the lease go if nothing is left to run."""
        async with self._leases.pinned(sid):
            try:
                adopted = await adopt_unanswered(
                    self._store, self.queue, sid, self._settings.history_limit
                )
                for message_id, options, future in adopted:
                    # To where its caller waited when it was stored: a process that is gone
                    # receives nothing (its callers went with it).
                    self._publish_when_done(message_id, future, options.reply_to)
                await self._mailbox.settle(sid)
            finally:
                if not self.queue.has(sid):
                    self._on_idle(sid)

    def _publish_when_done(
        self, message_id: UUID, future: asyncio.Future[Answer], to: str | None
    ) -> None:
        # Once per message and destination: a nudge's message that a take-over adopts again
        # (the owner's release found the session dirty while it ran) is the same future,
        # and its caller needs its answer once, not twice.
        key = (message_id, to)
        if key in self._publishing:
            return
        self._publishing.add(key)

        def publish(done: asyncio.Future[Answer]) -> None:
            self._publishing.discard(key)
            self._spawn(self._answer(message_id, done, to))

        future.add_done_callback(publish)

    async def _answer(
        self, message_id: UUID, future: asyncio.Future[Answer], to: str | None
    ) -> None:
        """Publish the answer of a message this process ran to the process ``to``, where its
        caller waits."""
        if future.cancelled():
            return
        error = future.exception()
        if isinstance(error, ShuttingDown):
            return  # not the caller's failure: once our lease is dropped, another process runs it
        answer: Answer | ThreadlineError
        if error is not None:
            # Not expected (the queue fails callers only with ThreadlineErrors); if it happens,
            # the remote caller still gets a defined error and nothing of the exception.
            answer = (
                error
                if isinstance(error, ThreadlineError)
                else RunFailed("the run failed unexpectedly")
            )
        else:
            answer = future.result()
            if isinstance(answer.outcome.error, Handoff):
                found = await stored_answer(self._store, message_id)
                if found is None:
                    return  # whoever runs it now publishes its answer
                answer = found
        await self._mailbox.publish(message_id, answer, to)

    # -- cancelling -----------------------------------------------------------------------

    async def cancel(self, session_id: UUID, run_id: UUID | None = None) -> bool:
        if self._leases.holds(session_id):
            return self.queue.cancel(session_id, run_id) is not None
        node = await self._leases.owner(session_id)
        if node is None:
            return False
        body = {"session_id": str(session_id), "cancel": str(run_id) if run_id else None}
        await self._leases.tell(node, json.dumps(body))
        return True

    def _on_nudge(self, body: dict[str, Any]) -> None:
        sid = UUID(body["session_id"])
        if not self._leases.holds(sid) or self._closing:
            return  # the sender's watchdog takes the session over once our lease is gone
        if "listed" in body:
            self._leases.listed_elsewhere(sid, int(body["listed"]))
        if "follow" in body:
            # A caller elsewhere repeats the idempotency key of one of our messages.
            options = RunOptions.from_json(body["options"])
            follow = self._follow_here(
                sid, UUID(body["follow"]), body["seq"], options, body.get("reply_to")
            )
            self._spawn(follow)
            return
        if "cancel" in body:
            run_id = body["cancel"]
            self.queue.cancel(sid, UUID(run_id) if run_id else None)
            return
        if "message_id" not in body:
            # "Look at the store": a message may have been stored without its caller knowing.
            self._spawn(self.take_over(sid))
            return
        message_id = UUID(body["message_id"])
        options = RunOptions.from_json(body["options"])
        future = self.queue.adopt(sid, message_id, body["seq"], body["strategy"], options)
        self._publish_when_done(message_id, future, options.reply_to)

    def _on_idle(self, sid: UUID) -> None:
        if sid in self._releasing or self._closing:
            return
        task = self._spawn(self._release(sid))
        self._releasing[sid] = task
        task.add_done_callback(lambda _: self._releasing.pop(sid, None))

    async def _release(self, sid: UUID) -> None:
        while not self.queue.has(sid):
            if await self._leases.release(sid) != "dirty":
                return
            # Someone stored a message since we last looked; answer it before letting go.
            await self.take_over(sid)

    # -- background steps ---------------------------------------------------------------

    async def _renew(self) -> None:
        lost, idle = await self._leases.renew(self.queue.has)
        for sid in idle:
            # Held with nothing to run here: let it go (a takeover that failed midway, say).
            self._on_idle(sid)
        for sid in lost:
            # The lease vanished (Redis restarted, or we stalled past the TTL) while the
            # session still runs here: take it back, unless another process holds it now, so
            # that new messages keep coming to this runner.
            if not await self._leases.claim(sid):
                log.warning("session %s running here is now owned by another process", sid)

    async def _watch(self) -> None:
        """Take over sessions whose owner died: those callers here wait on, then any other
        session whose lease ran out without a release, so its unanswered messages are
        answered even when every caller of it was connected to the dead process.

        Every session the pass finds is looked at in this pass, ``WATCH_CONCURRENCY`` at a
        time: a process dying with many sessions leaves its survivors that many takeovers at
        once, and the takeover bound (docs/architecture.md, "Watchdog scan") counts passes,
        so neither a cap on a pass nor one takeover after another may push some to later
        passes."""
        unreachable: CoordinatorUnavailable | None = None
        try:
            # The next few buckets of the orphan index (round-robin: see leases.py).
            orphans, stranded = await self._leases.scan(ORPHANS_PER_BUCKET)
        except CoordinatorUnavailable as exc:
            unreachable, orphans, stranded = exc, [], []
        for sid in stranded:
            # A process died between storing a message here and telling the owner.
            log.info("session %s may hold a message nobody announced; looking", sid)
            self._recover(sid)
        steps: dict[UUID, Callable[[UUID], Awaitable[None]]] = {}
        for sid in self._mailbox.sessions(older_than_s=self._ttl_s):
            if not self.queue.has(sid):  # else our own run answers them
                steps[sid] = self._take_if_waiting
        # An orphan's takeover answers the callers here too (``take_over`` settles them).
        steps.update((sid, self._take_orphan) for sid in orphans)
        limit = asyncio.Semaphore(WATCH_CONCURRENCY)
        # The steps log their own failures, so the group fails only if the pass is cancelled.
        async with asyncio.TaskGroup() as group:
            for sid, step in steps.items():
                group.create_task(self._watched(limit, sid, step))
        if unreachable is not None:
            raise unreachable  # for ``_every`` to log, once the steps that could run are done

    async def _watched(
        self,
        limit: asyncio.Semaphore,
        sid: UUID,
        step: Callable[[UUID], Awaitable[None]],
    ) -> None:
        """One session's step of a watchdog pass; its failure is logged, never the pass's."""
        async with limit:
            try:
                await step(sid)
            except ThreadlineError as exc:
                log.warning("watchdog could not take over session %s: %s", sid, exc)
            except Exception:
                log.exception("watchdog failed on session %s", sid)

    async def _take_if_waiting(self, sid: UUID) -> None:
        if await self._mailbox.settle(sid) and await self._leases.claim(sid):
            log.info("took over session %s", sid)
            metrics.TAKEOVERS.labels("dead_owner").inc()
            await self.take_over(sid)

    async def _take_orphan(self, sid: UUID) -> None:
        if await self._leases.claim(sid):
            log.info("took over orphaned session %s", sid)
            metrics.TAKEOVERS.labels("orphan").inc()
            await self.take_over(sid)

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` every ``interval`` seconds, start to start, forever; one failing step
        is logged, never the end of the loop."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = next_due(due, interval, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await step()
            except CoordinatorUnavailable as exc:
                log.warning("background step %s: %s", step.__name__, exc)
            except Exception:
                log.exception("background step %s failed", step.__name__)
            else:
                took = loop.time() - due
                if took > interval:
                    # The takeover bound counts passes of ``interval``: say when one ran long.
                    log.warning(
                        "background step %s took %.2fs, over its %.2fs interval",
                        step.__name__,
                        took,
                        interval,
                    )

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        # Errors a caller awaited are that caller's; anything else must not vanish silently.
        if exc is not None and not isinstance(exc, ThreadlineError):
            log.error("coordinator task failed", exc_info=exc)

    # -- lifecycle ----------------------------------------------------------------------

    async def ping(self) -> None:
        async with bounded(self._settings.redis_timeout_s):
            await self._redis.ping()

    def metrics(self) -> dict[str, Any]:
        return {
            "sessions_in_memory": self.queue.session_count,
            "queued_messages": self.queue.depth,
            "runs_in_flight": self.queue.running,
            "waiting_for_slot": self.queue.waiting_for_slot,
            "leases_held": len(self._leases),
            "callers_waiting_elsewhere": len(self._mailbox),
            "watchers": len(self.events),
            "repeats_waiting": self._repeats,
            "node": self.node,
            # Pub/sub traffic by kind (answer, event, nudge), and what is listened to now.
            "pubsub_published": dict(self._channels.published),
            "pubsub_received": dict(self._channels.received),
            "channels": sorted(self._channels.listening()),
        }

    async def drain(self, grace: float) -> None:
        self._closing = True
        await self.queue.aclose(grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._mailbox.fail_all(ShuttingDown("server shut down before the answer came"))
        # Let the sessions go now rather than after the lease expires, so another process
        # can take them over at once.
        await self._leases.drop_all()

    async def aclose(self, grace: float = 0.0) -> None:
        await self.drain(grace)
        await self._channels.aclose()
        await self._redis.aclose()
        await self._renewal.aclose()
        await self._watching.aclose()
