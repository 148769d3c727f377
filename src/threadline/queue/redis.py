"""Coordination across processes and hosts through Redis; PostgreSQL stays the source of truth.

Each session has at most one *owner* process, recorded in a Redis lease with an expiry that
the owner renews. The owner runs the session's turns in its local ``TurnQueue``; the other
processes only store messages and forward them::

    caller ─▶ process B                     Redis                       process A (owner)
              CLAIM lease ────────────────▶ held by A
              INSERT message (PostgreSQL)
              NUDGE: mark dirty, ─────────▶ PUBLISH node:A ───────────▶ adopt(message):
                     publish to A                                       cancel run, merge
              wait for answer ◀─────────── PUBLISH answers ◀─────────── run commits (fenced)

* A free lease is taken by whoever needs it: the process a message arrives at, or a process
  whose callers are waiting on a session whose owner died (the watchdog), which then answers
  every unanswered message it finds in PostgreSQL.
* The owner releases the lease when its queue goes idle, with one Lua step that refuses if the
  session was marked dirty meanwhile, so no message is stranded between the owner's last look
  and the release.
* Fencing is PostgreSQL's: opening a run makes it the session's current run and a commit only
  lands for the current run, so an owner that lost its lease (a pause, a partition) cannot
  store a reply once a new owner has opened a run.
* Redis errors surface as ``CoordinatorUnavailable`` (503): at once when Redis refuses the
  connection, within two attempts of ``REDIS_TIMEOUT_S`` when it does not answer. The lease is
  claimed before anything is stored, so a request failing at that step stored nothing; one
  failing at the nudge, after its insert, gets 503 although its message is stored, and the
  session's next run answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

from redis import __version__ as redis_version
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from threadline.agents import AgentRegistry
from threadline.config import Settings
from threadline.errors import (
    CoordinatorUnavailable,
    Fenced,
    QueueFull,
    SessionBusy,
    ShuttingDown,
    ThreadlineError,
)
from threadline.queue import keys
from threadline.queue.answers import decode_answer, encode_answer, stored_result
from threadline.queue.coordinator import TurnRequest
from threadline.queue.core import Answer, Outcome, Strategy
from threadline.queue.local import build_queue, storing, user_message
from threadline.runner import RunOptions
from threadline.store import Run, Store

log = logging.getLogger(__name__)

# Orphaned sessions one watchdog pass takes on at most; the next pass takes the rest.
ORPHAN_BATCH = 20

T = TypeVar("T")


class RedisCoordinator:
    def __init__(
        self, redis: Redis, store: Store, registry: AgentRegistry, settings: Settings
    ) -> None:
        self._redis = redis
        self._store = store
        self._registry = registry
        self._settings = settings
        self.node = uuid.uuid4().hex
        self._ttl_ms = settings.lease_ttl_ms
        # A dirty mark must outlive any owner that could still look at it.
        self._dirty_ttl_ms = settings.lease_ttl_ms * 10
        self.queue = build_queue(store, registry, settings, self._on_idle)
        self._claim = redis.register_script(keys.CLAIM)
        self._nudge = redis.register_script(keys.NUDGE)
        self._release_script = redis.register_script(keys.RELEASE)
        self._renew = redis.register_script(keys.RENEW)
        self._drop = redis.register_script(keys.DROP)
        self._orphans = redis.register_script(keys.ORPHANS)
        self._pubsub: PubSub = redis.pubsub(ignore_subscribe_messages=True)
        self._owned: set[UUID] = set()
        # Callers in this process waiting for an answer published by whichever process runs
        # their session: message id -> (session id, future, options).
        self._waiting: dict[UUID, tuple[UUID, asyncio.Future[Answer], RunOptions]] = {}
        self._releasing: dict[UUID, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    @classmethod
    async def connect(
        cls, settings: Settings, store: Store, registry: AgentRegistry
    ) -> RedisCoordinator:
        assert settings.redis_url is not None
        # A bounded pool: a burst of requests queues for a connection (up to REDIS_TIMEOUT_S)
        # instead of opening one connection per request, which under load costs more than the
        # commands themselves and can push a connect past its timeout.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            # One retry, no backoff: a caller must hear 503 within about REDIS_TIMEOUT_S,
            # not after a ladder of retries.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
            # Given explicitly, redis-py skips reading its package metadata from disk, a
            # blocking call on the event loop, on every new connection.
            driver_info=DriverInfo(name="redis-py", lib_version=redis_version),
        )
        redis = Redis.from_pool(pool)
        self = cls(redis, store, registry, settings)
        try:
            await redis.ping()
            await self._pubsub.subscribe(keys.node_channel(self.node), keys.ANSWERS_CHANNEL)
        except RedisError as exc:
            await redis.aclose()
            raise CoordinatorUnavailable(f"cannot reach Redis: {exc}") from exc
        self._spawn(self._listen())
        self._spawn(self._every(self._ttl_ms / 3000, self._renew_leases))
        self._spawn(self._every(max(0.2, self._ttl_ms / 4000), self._watch))
        return self

    # -- submitting --------------------------------------------------------------------

    async def submit(self, request: TurnRequest) -> Answer:
        if self._closing:
            raise ShuttingDown("server is shutting down; not accepting messages")
        loaded = await self._registry.get(request.agent)
        options = RunOptions(request.agent, request.user_id, request.history_limit, request.context)
        sid = request.session_id
        owner = await self._claim_lease(sid)
        if owner == self.node:
            self._owned.add(sid)
            return await self._submit_local(request, options, loaded.model_name)
        return await self._submit_remote(request, options)

    async def _submit_local(
        self, request: TurnRequest, options: RunOptions, model_name: str
    ) -> Answer:
        sid = request.session_id
        ids: list[UUID] = []

        def on_stored(message_id: UUID) -> None:
            ids.append(message_id)
            # Should this process lose the session mid-run, the answer comes from the new
            # owner, addressed by message id.
            self._expect(sid, message_id, options)

        accept = storing(self._store, request, model_name, on_stored)
        try:
            answer = await self.queue.submit(sid, request.strategy, accept, options)
            if isinstance(answer.outcome.error, Fenced):
                return await asyncio.shield(self._waiting[answer.message_id][1])
            return answer
        finally:
            for message_id in ids:
                self._forget(message_id)

    async def _submit_remote(self, request: TurnRequest, options: RunOptions) -> Answer:
        sid = request.session_id
        if request.strategy == "reject":
            raise SessionBusy(sid, None)
        backlog = await self._store.unanswered(sid)
        if len(backlog) >= self._settings.session_queue_max:
            raise QueueFull(sid, self._settings.session_queue_max)
        stored, _ = await self._store.add_user_message(sid, user_message(request))
        future = self._expect(sid, stored.id, options)
        payload = json.dumps(
            {
                "session_id": str(sid),
                "message_id": str(stored.id),
                "seq": stored.seq,
                "strategy": request.strategy,
                "options": {
                    "agent": options.agent,
                    "user_id": options.user_id,
                    "history_limit": options.history_limit,
                    "context": dict(options.context),
                },
            }
        )
        try:
            owner = await self._call(
                self._nudge,
                [keys.lease(sid), keys.dirty(sid), keys.ACTIVE],
                [
                    self.node,
                    self._ttl_ms,
                    self._dirty_ttl_ms,
                    keys.node_channel(""),
                    payload,
                    str(sid),
                ],
            )
            if owner == self.node:
                # The owner released the session between our two calls: it is ours now.
                self._owned.add(sid)
                await self._adopt_unanswered(sid, options)
            return await asyncio.shield(future)
        finally:
            self._forget(stored.id)

    def _expect(self, sid: UUID, message_id: UUID, options: RunOptions) -> asyncio.Future[Answer]:
        entry = self._waiting.get(message_id)
        if entry is None:
            entry = (sid, asyncio.get_running_loop().create_future(), options)
            self._waiting[message_id] = entry
        return entry[1]

    def _forget(self, message_id: UUID) -> None:
        self._waiting.pop(message_id, None)

    # -- owning sessions ---------------------------------------------------------------

    def _adopt(
        self, sid: UUID, message_id: UUID, seq: int, strategy: Strategy, options: RunOptions
    ) -> None:
        future = self.queue.adopt(sid, message_id, seq, strategy, options)
        future.add_done_callback(lambda f: self._spawn(self._publish(message_id, f)))

    async def _adopt_unanswered(self, sid: UUID, options: RunOptions | None = None) -> None:
        """Take on every unanswered message of a session we own (after a takeover, or when
        the session was marked dirty and a nudge may have been lost)."""
        pending = await self._store.unanswered(sid)
        if not pending:
            return
        if options is None:
            session = await self._store.get_session(sid)
            if session is None:
                return
            options = RunOptions(session.agent, session.user_id, self._settings.history_limit)
        for message in pending:
            self._adopt(sid, message.id, message.seq, "merge", options)

    async def _publish(self, message_id: UUID, future: asyncio.Future[Answer]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        answer = None if error is not None else future.result()
        payload = encode_answer(answer, error, message_id)
        self._deliver(json.loads(payload))  # a caller here needs no round-trip through Redis
        try:
            await self._redis.publish(keys.ANSWERS_CHANNEL, payload)
        except RedisError as exc:
            # Callers elsewhere fall back to the watchdog, which finds the reply in the store.
            log.warning("could not publish answer for %s: %s", message_id, exc)

    def _deliver(self, body: dict[str, Any]) -> None:
        entry = self._waiting.get(UUID(body["message_id"]))
        if entry is None or entry[1].done():
            return
        decoded = decode_answer(body)
        if isinstance(decoded, Answer):
            entry[1].set_result(decoded)
        else:
            entry[1].set_exception(decoded)

    def _on_idle(self, sid: UUID) -> None:
        if sid in self._releasing or self._closing:
            return
        task = self._spawn(self._release(sid))
        self._releasing[sid] = task
        task.add_done_callback(lambda _: self._releasing.pop(sid, None))

    async def _release(self, sid: UUID) -> None:
        while not self.queue.has(sid):
            try:
                result = await self._call(
                    self._release_script,
                    [keys.lease(sid), keys.dirty(sid), keys.ACTIVE],
                    [self.node, str(sid)],
                )
            except CoordinatorUnavailable as exc:
                # The lease expires on its own; until then, nudges still reach us.
                log.warning("could not release session %s: %s", sid, exc)
                return
            if result != b"dirty" and result != "dirty":
                self._owned.discard(sid)
                return
            # Someone stored a message since we last looked; answer it before letting go.
            if self.queue.has(sid):
                return
            await self._adopt_unanswered(sid)

    async def _answer_from_store(self, sid: UUID) -> None:
        """Resolve callers here whose message a run has already answered.

        Their answer was published while we could not hear it (Redis was down), or never: a
        process that claims a free lease for a message of its own answers the older
        unanswered messages in the same run without publishing anything for them.
        """
        waiting = {
            message_id: future
            for message_id, (session, future, _) in self._waiting.items()
            if session == sid and not future.done()
        }
        for message in await self._store.unanswered(sid):
            waiting.pop(message.id, None)
        seen: list[UUID] = []
        runs: dict[UUID, Run | None] = {}
        offset = 0
        while waiting:
            page, total = await self._store.list_messages(sid, limit=500, offset=offset)
            for row in page:
                if row.id in waiting:
                    seen.append(row.id)
                if row.role != "assistant" or row.run_id is None or not seen:
                    continue
                if row.run_id not in runs:
                    runs[row.run_id] = await self._store.get_run(row.run_id)
                run = runs[row.run_id]
                if run is None:
                    continue
                for message_id in [m for m in seen if m in run.message_ids]:
                    seen.remove(message_id)
                    outcome = Outcome(run.id, run.message_ids, stored_result(row, run))
                    waiting.pop(message_id).set_result(Answer(message_id, outcome, False))
            offset += len(page)
            if not page or offset >= total:
                break

    # -- background loops --------------------------------------------------------------

    async def _listen(self) -> None:
        node_channel = keys.node_channel(self.node).encode()
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("Redis subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.subscribe(keys.node_channel(self.node), keys.ANSWERS_CHANNEL)
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                body = json.loads(message["data"])
                if message["channel"] == node_channel:
                    self._on_nudge(body)
                else:
                    self._deliver(body)
            except Exception:
                log.exception("bad message on %r", message.get("channel"))

    def _on_nudge(self, body: dict[str, Any]) -> None:
        sid = UUID(body["session_id"])
        if sid not in self._owned or self._closing:
            return  # the sender's watchdog takes the session over once our lease is gone
        raw = body["options"]
        options = RunOptions(raw["agent"], raw["user_id"], raw["history_limit"], raw["context"])
        self._adopt(sid, UUID(body["message_id"]), body["seq"], body["strategy"], options)

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` forever; one failing step is logged, never the end of the loop."""
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:
                log.exception("background step %s failed", step.__name__)

    async def _renew_leases(self) -> None:
        owned = list(self._owned)
        if not owned:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in owned:
                    await self._renew(
                        keys=[keys.lease(sid), keys.ACTIVE],
                        args=[self.node, self._ttl_ms, str(sid)],
                        client=pipe,
                    )
                renewed = await pipe.execute()
        except RedisError as exc:
            log.warning("could not renew leases: %s", exc)
            return
        for sid, ok in zip(owned, renewed, strict=True):
            if ok:
                continue
            if not self.queue.has(sid):
                self._owned.discard(sid)
                continue
            # The lease vanished (Redis restarted, or we stalled past the TTL) while the
            # session still runs here: take it back, unless another process holds it now,
            # so that new messages keep coming to this runner.
            try:
                owner = await self._claim_lease(sid)
            except CoordinatorUnavailable as exc:
                log.warning("could not reclaim session %s: %s", sid, exc)
                continue
            if owner != self.node:
                log.warning("session %s running here is now owned by %s", sid, owner)

    async def _watch(self) -> None:
        """Take over sessions whose owner died: those callers here wait on, then any other
        session whose lease ran out without a release, so its unanswered messages are
        answered even when every caller of it was connected to the dead process."""
        await self._watch_waiting()
        await self._adopt_orphans()

    async def _adopt_orphans(self) -> None:
        try:
            found = await self._orphans(keys=[keys.ACTIVE], args=[ORPHAN_BATCH])
        except RedisError as exc:
            log.warning("watchdog could not list orphaned sessions: %s", exc)
            return
        for raw in found:
            sid = UUID(raw.decode() if isinstance(raw, bytes) else raw)
            try:
                if await self._claim_lease(sid) != self.node:
                    continue  # another process owns it now; its renewals keep it listed
                self._owned.add(sid)
                await self._adopt_unanswered(sid)
                if self.queue.has(sid):
                    log.info("took over orphaned session %s", sid)
                else:
                    self._on_idle(sid)  # nothing left to answer: release, and unlist it
            except ThreadlineError as exc:
                log.warning("watchdog could not take over session %s: %s", sid, exc)

    async def _watch_waiting(self) -> None:
        sessions: dict[UUID, RunOptions] = {}
        for sid, future, options in list(self._waiting.values()):
            if not future.done() and sid not in self._owned:
                sessions[sid] = options
        for sid, options in sessions.items():
            try:
                if await self._claim_lease(sid) != self.node:
                    continue
                log.info("took over session %s", sid)
                self._owned.add(sid)
                await self._adopt_unanswered(sid, options)
                await self._answer_from_store(sid)
                if not self.queue.has(sid):
                    self._on_idle(sid)  # nothing left to run: let the lease go
            except ThreadlineError as exc:
                log.warning("watchdog could not check session %s: %s", sid, exc)

    async def _claim_lease(self, sid: UUID) -> Any:
        return await self._call(
            self._claim,
            [keys.lease(sid), keys.dirty(sid), keys.ACTIVE],
            [self.node, self._ttl_ms, self._dirty_ttl_ms, str(sid)],
        )

    # -- plumbing ----------------------------------------------------------------------

    async def _call(
        self, script: Callable[..., Awaitable[T]], keys_: list[str], args: list[Any]
    ) -> Any:
        try:
            result = await script(keys=keys_, args=args)
        except RedisError as exc:
            raise CoordinatorUnavailable(f"Redis is unreachable: {exc}") from exc
        return result.decode() if isinstance(result, bytes) else result

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise CoordinatorUnavailable(f"Redis is unreachable: {exc}") from exc

    def metrics(self) -> dict[str, Any]:
        return {
            "sessions_in_memory": self.queue.session_count,
            "runs_in_flight": self.queue.running,
            "leases_held": len(self._owned),
            "callers_waiting_elsewhere": len(self._waiting),
            "node": self.node,
        }

    async def aclose(self, grace: float = 0.0) -> None:
        self._closing = True
        await self.queue.aclose(grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(ShuttingDown("server shut down before the answer came"))
        with contextlib.suppress(RedisError, OSError):
            # Let the sessions go now rather than after the lease expires, so another
            # process can take them over at once.
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in self._owned:
                    await self._drop(
                        keys=[keys.lease(sid), keys.ACTIVE], args=[self.node, str(sid)], client=pipe
                    )
                await pipe.execute()
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()
