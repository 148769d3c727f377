"""``Mailbox``: the one owner of this process's callers that wait for an answer by message id.

A caller waits here when its message is answered by a run that may not be ours: it arrived at
a process that does not own its session, or our run handed off (another run answered, a newer
owner took over). Answers reach it three ways, whichever comes first:

* ``deliver``: published on the answers channel by the process that ran the message (or
  handed over directly, when that process is this one);
* ``settle``: read back from the store (``Store.answer_for``), for a publication that was
  lost (Redis was down, the publisher died after its commit) and for a handoff;
* a defined error: the session was deleted (404), or this process shuts down (503).

``listen`` is the subscription loop: answers go to ``deliver``, nudges to the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from threadline.coordination import keys
from threadline.coordination.answers import decode_answer, encode_answer, stored_answer
from threadline.coordination.connection import Client
from threadline.coordination.leases import bounded
from threadline.errors import CoordinatorUnavailable, SessionNotFound, ThreadlineError
from threadline.queue.job import Answer
from threadline.store import Store

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Expected:
    session_id: UUID
    future: asyncio.Future[Answer]
    since: float
    waiters: int = 1


class Mailbox:
    def __init__(self, redis: Client, store: Store, node: str, *, timeout_s: float) -> None:
        self._redis = redis
        self._store = store
        self._node = node
        self._timeout_s = timeout_s
        self._expected: dict[UUID, _Expected] = {}
        self._pubsub: PubSub = redis.pubsub(ignore_subscribe_messages=True)

    async def open(self) -> None:
        await self._pubsub.subscribe(keys.node_channel(self._node), keys.ANSWERS_CHANNEL)

    def __len__(self) -> int:
        return len(self._expected)

    # -- callers ------------------------------------------------------------------------

    def expect(self, session_id: UUID, message_id: UUID) -> asyncio.Future[Answer]:
        """Register interest in a message's answer; pair every call with ``forget``."""
        entry = self._expected.get(message_id)
        if entry is None:
            future = asyncio.get_running_loop().create_future()
            entry = self._expected[message_id] = _Expected(session_id, future, time.monotonic())
        else:
            entry.waiters += 1
        return entry.future

    def forget(self, message_id: UUID) -> None:
        entry = self._expected.get(message_id)
        if entry is None:
            return
        entry.waiters -= 1
        if entry.waiters <= 0:
            del self._expected[message_id]
            if not entry.future.done():
                entry.future.cancel()

    async def wait(self, session_id: UUID, message_id: UUID) -> Answer:
        """The answer of a stored message, from wherever it comes; the store is asked first,
        in case the answer was published before we listened."""
        future = self.expect(session_id, message_id)
        try:
            found = await stored_answer(self._store, message_id)
            if found is not None:
                self._resolve(message_id, found)
            return await asyncio.shield(future)
        finally:
            self.forget(message_id)

    def sessions(self, older_than_s: float = 0.0) -> set[UUID]:
        """Sessions with callers here that have waited at least ``older_than_s``."""
        cutoff = time.monotonic() - older_than_s
        return {
            e.session_id
            for e in self._expected.values()
            if not e.future.done() and e.since <= cutoff
        }

    async def settle(self, session_id: UUID) -> bool:
        """Resolve the callers of a session whose answer is in the store (or whose session
        is gone) without having reached us. True if some are still waiting."""
        waiting = [
            message_id
            for message_id, e in self._expected.items()
            if e.session_id == session_id and not e.future.done()
        ]
        unanswered = 0
        for message_id in waiting:
            found = await stored_answer(self._store, message_id)
            if found is not None:
                self._resolve(message_id, found)
            else:
                unanswered += 1
        if unanswered and await self._store.get_session(session_id) is None:
            gone = SessionNotFound(f"session {str(session_id)!r} was deleted")
            for message_id in waiting:
                self._resolve(message_id, gone)
        # Re-read: an answer may have been delivered while we asked the store.
        return any(
            (e := self._expected.get(message_id)) is not None and not e.future.done()
            for message_id in waiting
        )

    def fail_all(self, error: ThreadlineError) -> None:
        for message_id in list(self._expected):
            self._resolve(message_id, error)

    # -- answers ------------------------------------------------------------------------

    async def publish(self, message_id: UUID, answer: Answer | ThreadlineError) -> None:
        """Hand an answer to its callers here at once, and to every other process."""
        self._resolve(message_id, answer)
        payload = encode_answer(message_id, answer)
        try:
            async with bounded(self._timeout_s):
                await self._redis.publish(keys.ANSWERS_CHANNEL, payload)
        except CoordinatorUnavailable as exc:
            # Callers elsewhere fall back to their watchdog, which reads the store.
            log.warning("could not publish the answer for %s: %s", message_id, exc)

    def deliver(self, body: dict[str, Any]) -> None:
        message_id = UUID(body["message_id"])
        if message_id in self._expected:
            self._resolve(message_id, decode_answer(body))

    def _resolve(self, message_id: UUID, answer: Answer | ThreadlineError) -> None:
        entry = self._expected.get(message_id)
        if entry is None or entry.future.done():
            return  # one answer per caller: the first that arrives
        if isinstance(answer, Answer):
            entry.future.set_result(answer)
        else:
            entry.future.set_exception(answer)

    # -- subscription -------------------------------------------------------------------

    async def listen(self, on_nudge: Callable[[dict[str, Any]], None]) -> None:
        """Dispatch what arrives on our channels, forever; resubscribe after a Redis outage."""
        node_channel = keys.node_channel(self._node).encode()
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("Redis subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(RedisError, OSError):
                    await self.open()
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                body = json.loads(message["data"])
                if message["channel"] == node_channel:
                    on_nudge(body)
                else:
                    self.deliver(body)
            except Exception:
                log.exception("bad message on %r", message.get("channel"))

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
