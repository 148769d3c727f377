"""``Leases``: the one owner of the session leases this process holds.

A lease says which process runs a session's turns. This object alone knows which leases are
held here (session -> claim token) and changes that set only from the replies of the atomic
scripts in ``scripts.py``:

* ``claim`` takes a free lease, or finds it ours already (and marks the session dirty);
  ``claim_to_store``, before an insert into a session another process owns, also lists the
  insert as in flight until its ``nudge``, so ``stranded`` finds it if this process dies in
  between;
* ``nudge`` hands a stored message to the owner, or takes the free lease;
* ``release`` lets a lease go unless the session is dirty; a reply about an older claim
  never drops a newer one (the token's generation);
* ``renew`` extends every held lease on a connection of its own, so a request pool exhausted
  under load cannot starve renewals and lose every lease at once; it reports leases lost and
  held leases whose session has nothing left here (no zombie lease is renewed forever);
* ``pinned`` keeps a lease from being counted idle while a takeover is loading its session.

Every call is bounded by ``REDIS_TIMEOUT_S`` as a whole, retries included, and raises
``CoordinatorUnavailable`` beyond it.

The orphan index. A process that dies holding leases never releases them; the watchdogs find
such sessions in the index (``keys.active``): one entry per leased session, scored by when
its lease runs out, in one of ``N_BUCKETS`` sorted sets. The lease (the session's slot) and
its entry (the bucket's slot) cannot change in one script on a Redis Cluster, so they change
in an order that keeps the one invariant that matters, *a held lease is listed*:

* the entry is written (``LIST``) before the lease is taken or renewed, in the same
  pipeline ahead of the claim where one connection applies both in order (standalone,
  Sentinel), as a separate call before it on a cluster;
* the entry is removed (``UNLIST``) only after the lease was released, and only if nobody
  listed the session since: ``LIST`` returns a score that only grows while the entry exists,
  and ``UNLIST`` removes the entry only at the score its releaser got back. A claim racing
  the release lists first, so its entry survives. A caller whose claim found another owner
  has moved the score too; its nudge tells the owner that score (``listed_elsewhere``), so
  the owner's release still removes the entry.

A crash between the two steps leaves an entry without a lease, never a lease without an
entry; the watchdog that finds such an entry due claims the session, finds nothing to run
and releases it (removing the entry). ``renew`` lists before it renews, so an entry's score
is at least its lease's expiry (an entry due while its lease lives costs one failed claim).

Watchdogs scan ``BUCKETS_PER_TICK`` buckets per pass, round-robin from a random start, so the
index has no hot key; a process reads every bucket within ``N_BUCKETS / BUCKETS_PER_TICK``
passes, so a dead owner's session is found at most that many watchdog intervals after its
lease ran out (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from redis.asyncio import Redis

from threadline.coordination import keys, scripts
from threadline.coordination.connection import (
    FAILURES,
    Call,
    Client,
    Script,
    pipelined,
    raised_in_client,
)
from threadline.errors import CoordinatorUnavailable

if TYPE_CHECKING:
    from threadline.coordination.channels import Channels

log = logging.getLogger(__name__)

# Buckets of the orphan index one watchdog pass reads: a full round takes
# N_BUCKETS / BUCKETS_PER_TICK passes.
BUCKETS_PER_TICK = 8

Release = Literal["released", "dirty", "lost", "unheld"]


@contextlib.asynccontextmanager
async def bounded(timeout_s: float) -> AsyncIterator[None]:
    """One Redis step, bounded as a whole (connection wait, retries and all) by
    ``REDIS_TIMEOUT_S``; any failure is ``CoordinatorUnavailable`` (503), as is anything
    redis-py itself raised (logged with its traceback); other exceptions pass."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (*FAILURES, TimeoutError) as exc:
        raise CoordinatorUnavailable(f"Redis is unreachable: {exc}") from exc
    except Exception as exc:
        if not raised_in_client(exc):
            raise
        log.warning("the Redis client failed", exc_info=True)
        raise CoordinatorUnavailable(f"the Redis client failed: {exc!r}") from exc


class Leases:
    def __init__(
        self,
        redis: Client,
        renewal: Client,
        node: str,
        channels: Channels,
        *,
        ttl_ms: int,
        dirty_ttl_ms: int,
        timeout_s: float,
    ) -> None:
        self.node = node
        self._channels = channels
        self._redis = redis
        self._renewal = renewal
        self._ttl_ms = ttl_ms
        self._dirty_ttl_ms = dirty_ttl_ms
        self._timeout_s = timeout_s
        # One connection runs a pipeline's commands in order; a cluster pipeline sends to
        # each node apart, in no order between them.
        self._ordered = isinstance(redis, Redis)
        self._held: dict[UUID, str] = {}
        # The score our last LIST of each held session got back (what UNLIST must match).
        self._scores: dict[UUID, int] = {}
        self._pins: Counter[UUID] = Counter()
        self._generation = itertools.count(1)
        self._cursor = random.randrange(keys.N_BUCKETS)
        self._claim = redis.register_script(scripts.CLAIM)
        self._nudge = redis.register_script(scripts.NUDGE)
        self._release = redis.register_script(scripts.RELEASE)
        self._drop = redis.register_script(scripts.DROP)
        self._list = redis.register_script(scripts.LIST)
        self._unlist = redis.register_script(scripts.UNLIST)
        self._due = redis.register_script(scripts.DUE)
        self._inflight = redis.register_script(scripts.INFLIGHT)
        self._announced = redis.register_script(scripts.ANNOUNCED)
        self._orphans = redis.register_script(scripts.ORPHANS)
        self._stranded = redis.register_script(scripts.STRANDED)
        self._renew = renewal.register_script(scripts.RENEW)
        self._relist = renewal.register_script(scripts.LIST)

    def holds(self, session_id: UUID) -> bool:
        return session_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    async def claim(self, session_id: UUID) -> bool:
        """Take the session's lease if it is free; True if this process owns it now."""
        return await self._claim_with(session_id, self._token())

    async def claim_to_store(self, session_id: UUID) -> str | None:
        """``claim`` before storing a message: None if this process owns the session now;
        else the token that lists the insert in flight (until its ``nudge``, which must
        carry it), so that ``scan`` finds the insert should this process die in between."""
        token = self._token()
        if await self._claim_with(session_id, token):
            return None
        member = f"{session_id}|{token}"
        await self._call(
            self._inflight, [keys.inflight(keys.bucket(session_id))], [member, self._ttl_ms]
        )
        return token

    async def _claim_with(self, session_id: UUID, token: str) -> bool:
        args = [token, self._ttl_ms, self._dirty_ttl_ms, self.node]
        score, owner = await self._listed_then(session_id, self._claim, args)
        return self._took(session_id, owner, score)

    async def owner(self, session_id: UUID) -> str | None:
        """The node that holds the session's lease, if any."""
        async with bounded(self._timeout_s):
            token = await self._redis.get(keys.lease(session_id))
        if token is None:
            return None
        node, _, _ = (token.decode() if isinstance(token, bytes) else str(token)).rpartition(":")
        return node

    async def tell(self, node: str, payload: str) -> None:
        """A direct message to one process (its node channel)."""
        await self._channels.publish(keys.node_channel(node), payload, "nudge")

    async def nudge(
        self, session_id: UUID, payload: dict[str, Any], token: str | None = None
    ) -> bool:
        """Tell the owner about a stored message (unlisting the insert ``token`` stands for);
        True if the lease was free and is ours now. The owner is also told the index score
        our LIST got (``listed``: see ``listed_elsewhere``)."""
        args = [token or self._token(), self._ttl_ms, self._dirty_ttl_ms, self.node]
        unlist: Call | None = None
        if token is not None:
            # After the dirty mark is set, not before: until then the entry is what finds
            # the insert should we die.
            member = f"{session_id}|{token}"
            unlist = (self._announced, [keys.inflight(keys.bucket(session_id))], [member])
        score, owner = await self._listed_then(session_id, self._nudge, args, unlist)
        owner_node = owner.rpartition(":")[0]
        if owner_node != self.node:
            # Outside the script: the owner's channel is in another slot. The dirty mark,
            # set atomically with the owner's release, is what makes the message safe; this
            # only makes the owner look at once rather than when it goes idle.
            await self.tell(owner_node, json.dumps({**payload, "listed": score}))
        return self._took(session_id, owner, score)

    def listed_elsewhere(self, session_id: UUID, score: int) -> None:
        """A nudge told us the score another process's LIST gave our session's entry, while
        we held its lease (so that process's claim failed, and it will not hold the lease at
        that score). Our release may then unlist the entry at it, where its UNLIST would
        otherwise find the score moved and leave the entry for a watchdog's cleanup (a
        claim, two store reads and a release, per session gone quiet after a remote turn)."""
        if session_id in self._held and score > self._scores.get(session_id, score):
            self._scores[session_id] = score

    async def release(self, session_id: UUID) -> Release:
        token = self._held.get(session_id)
        if token is None:
            return "unheld"
        # Read before the release: a LIST after it (a new claim) must keep its entry.
        score = self._scores.get(session_id)
        result = await self._call(self._release, self._lease_keys(session_id), [token])
        if result != "dirty" and self._held.get(session_id) == token:
            del self._held[session_id]
            self._scores.pop(session_id, None)
        if result == "released" and score is not None:
            # Best effort: an entry left behind costs a watchdog one claim, nothing more.
            with contextlib.suppress(CoordinatorUnavailable):
                await self._call(
                    self._unlist, [keys.active(keys.bucket(session_id))], [str(session_id), score]
                )
        return result  # type: ignore[no-any-return]

    async def renew(self, wanted: Callable[[UUID], bool]) -> tuple[list[UUID], list[UUID]]:
        """Renew every held lease. Returns (lost, idle): leases that vanished while their
        session is still wanted here, and held leases whose session is not wanted (to be
        released by the caller)."""
        held = list(self._held.items())
        if not held:
            return [], []
        calls: list[Call] = []
        for session_id, token in held:
            # Listed before renewed (see the module docstring).
            calls.append(
                (
                    self._relist,
                    [keys.active(keys.bucket(session_id))],
                    [str(session_id), self._ttl_ms],
                )
            )
            calls.append((self._renew, [keys.lease(session_id)], [token, self._ttl_ms]))
        replies = await self._pipeline(self._renewal, calls)
        lost: list[UUID] = []
        idle: list[UUID] = []
        for i, (session_id, token) in enumerate(held):
            score, ok = replies[2 * i], replies[2 * i + 1]
            is_wanted = wanted(session_id) or self._pins[session_id] > 0
            if not ok:
                if self._held.get(session_id) == token:
                    del self._held[session_id]
                    self._scores.pop(session_id, None)
                if is_wanted:
                    lost.append(session_id)
                continue
            if self._held.get(session_id) == token:
                self._scores[session_id] = int(score)
            if not is_wanted:
                idle.append(session_id)
        return lost, idle

    async def scan(self, limit: int) -> tuple[list[UUID], list[UUID]]:
        """The watchdog's read of the next ``BUCKETS_PER_TICK`` buckets of the index, at most
        ``limit`` entries of each kind per bucket: (orphans, stranded). Orphans: sessions
        whose lease ran out without a release (their owner died). Stranded: sessions into
        which a process that died may have stored a message it never announced (see
        scripts.STRANDED); each is returned to one caller only."""
        buckets = [(self._cursor + i) % keys.N_BUCKETS for i in range(BUCKETS_PER_TICK)]
        self._cursor = (self._cursor + BUCKETS_PER_TICK) % keys.N_BUCKETS
        calls: list[Call] = []
        for i in buckets:
            calls.append((self._orphans, [keys.active(i)], [limit]))
            calls.append((self._stranded, [keys.inflight(i)], [limit]))
        replies = await self._pipeline(self._redis, calls)
        orphans: dict[UUID, None] = {}
        stranded: dict[UUID, None] = {}
        for n, found in enumerate(replies):
            for raw in found:
                member = raw.decode() if isinstance(raw, bytes) else str(raw)
                into = orphans if n % 2 == 0 else stranded
                into[UUID(member.partition("|")[0])] = None
        return list(orphans), list(stranded)

    async def drop_all(self) -> None:
        """At shutdown: let every held session go at once, dirty or not (see DROP)."""
        held, self._held = self._held, {}
        scores, self._scores = self._scores, {}
        if not held:
            return
        # Best effort: leases that stay expire within the TTL anyway, and stay listed.
        with contextlib.suppress(CoordinatorUnavailable):
            drops: list[Call] = [
                (self._drop, [keys.lease(session_id)], [token])
                for session_id, token in held.items()
            ]
            await self._pipeline(self._redis, drops)
            # Only once the leases are gone, so that a watchdog taking one finds it free.
            dues: list[Call] = [
                (self._due, [keys.active(keys.bucket(session_id))], [str(session_id), score])
                for session_id, score in scores.items()
                if session_id in held
            ]
            await self._pipeline(self._redis, dues)

    @contextlib.asynccontextmanager
    async def pinned(self, session_id: UUID) -> AsyncIterator[None]:
        self._pins[session_id] += 1
        try:
            yield
        finally:
            self._pins[session_id] -= 1
            if self._pins[session_id] <= 0:
                del self._pins[session_id]

    def _token(self) -> str:
        return f"{self.node}:{next(self._generation)}"

    def _took(self, session_id: UUID, owner: str, score: int) -> bool:
        if owner.startswith(f"{self.node}:"):
            # Ours: a new claim, or the claim we hold (whose token stays what Redis holds).
            self._held[session_id] = owner
            self._scores[session_id] = score
            return True
        return False

    @staticmethod
    def _lease_keys(session_id: UUID) -> list[str]:
        return [keys.lease(session_id), keys.dirty(session_id)]

    async def _listed_then(
        self, session_id: UUID, script: Script, args: list[Any], after: Call | None = None
    ) -> tuple[int, str]:
        """LIST the session, then run a session script that may take its lease (then
        ``after``, if given). Returns LIST's score and the script's reply."""
        calls: list[Call] = [
            (self._list, [keys.active(keys.bucket(session_id))], [str(session_id), self._ttl_ms]),
            (script, self._lease_keys(session_id), args),
        ]
        if after is not None:
            calls.append(after)
        if self._ordered:
            replies = await self._pipeline(self._redis, calls)
        else:
            replies = [await self._call(*call) for call in calls]
        reply = replies[1]
        return int(replies[0]), reply.decode() if isinstance(reply, bytes) else reply

    async def _pipeline(self, client: Client, calls: Sequence[Call]) -> list[Any]:
        """Run scripts in one round trip per node (no transaction); raise if any failed."""
        if not calls:
            return []
        async with bounded(self._timeout_s):
            replies = await pipelined(client, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise CoordinatorUnavailable(f"Redis is unreachable: {reply}") from reply
        return replies

    async def _call(self, script: Script, keys_: list[str], args: list[Any]) -> Any:
        async with bounded(self._timeout_s):
            result = await script(keys=keys_, args=args)
        return result.decode() if isinstance(result, bytes) else result
