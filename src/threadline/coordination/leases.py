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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from threadline.coordination import keys, scripts
from threadline.errors import CoordinatorUnavailable

if TYPE_CHECKING:
    from threadline.coordination.channels import Channels

Release = Literal["released", "dirty", "lost", "unheld"]


@contextlib.asynccontextmanager
async def bounded(timeout_s: float) -> AsyncIterator[None]:
    """One Redis step, bounded as a whole (connection wait, retries and all) by
    ``REDIS_TIMEOUT_S``; any failure is ``CoordinatorUnavailable`` (503)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise CoordinatorUnavailable(f"Redis is unreachable: {exc}") from exc


class Leases:
    def __init__(
        self,
        redis: Redis,
        renewal: Redis,
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
        self._held: dict[UUID, str] = {}
        self._pins: Counter[UUID] = Counter()
        self._generation = itertools.count(1)
        self._claim = redis.register_script(scripts.CLAIM)
        self._nudge = redis.register_script(scripts.NUDGE)
        self._release = redis.register_script(scripts.RELEASE)
        self._drop = redis.register_script(scripts.DROP)
        self._orphans = redis.register_script(scripts.ORPHANS)
        self._stranded = redis.register_script(scripts.STRANDED)
        self._renew = renewal.register_script(scripts.RENEW)

    def holds(self, session_id: UUID) -> bool:
        return session_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    async def claim(self, session_id: UUID) -> bool:
        """Take the session's lease if it is free; True if this process owns it now."""
        return await self._claim_with(session_id, self._token(), inflight_ms=0)

    async def claim_to_store(self, session_id: UUID) -> str | None:
        """``claim`` before storing a message: None if this process owns the session now;
        else the token that lists the insert in flight, which its ``nudge`` must carry."""
        token = self._token()
        if await self._claim_with(session_id, token, inflight_ms=self._ttl_ms):
            return None
        return token

    async def _claim_with(self, session_id: UUID, token: str, *, inflight_ms: int) -> bool:
        owner = await self._call(
            self._claim,
            self._keys(session_id),
            [token, self._ttl_ms, self._dirty_ttl_ms, str(session_id), self.node, inflight_ms],
        )
        return self._took(session_id, owner)

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

    async def nudge(self, session_id: UUID, payload: str, token: str | None = None) -> bool:
        """Tell the owner about a stored message (unlisting the insert ``token`` stands for);
        True if the lease was free and is ours now."""
        token = token or self._token()
        # Sharded (Redis Cluster), the owner's channel is in another slot than the session's
        # keys: the script marks the session dirty and we publish after it. Should this
        # process die in between, the message is stored and the session dirty but its owner
        # not told: it finds the mark when it next goes idle (``release`` answers "dirty",
        # or ``renew`` finds the lease idle) and answers the message from the store then.
        # Its caller died with this process.
        in_script = not self._channels.sharded
        owner = await self._call(
            self._nudge,
            self._keys(session_id),
            [
                token,
                self._ttl_ms,
                self._dirty_ttl_ms,
                str(session_id),
                self.node,
                self._channels.publish_command if in_script else "",
                keys.NODE_CHANNEL_PREFIX,
                keys.NODE_CHANNEL_SUFFIX,
                payload,
            ],
        )
        if self._took(session_id, owner):
            return True
        if in_script:
            self._channels.count_published("nudge")
        else:
            await self.tell(owner.rpartition(":")[0], payload)
        return False

    async def release(self, session_id: UUID) -> Release:
        token = self._held.get(session_id)
        if token is None:
            return "unheld"
        result = await self._call(self._release, self._keys(session_id), [token, str(session_id)])
        if result != "dirty" and self._held.get(session_id) == token:
            del self._held[session_id]
        return result  # type: ignore[no-any-return]

    async def renew(self, wanted: Callable[[UUID], bool]) -> tuple[list[UUID], list[UUID]]:
        """Renew every held lease. Returns (lost, idle): leases that vanished while their
        session is still wanted here, and held leases whose session is not wanted (to be
        released by the caller)."""
        held = list(self._held.items())
        if not held:
            return [], []
        async with bounded(self._timeout_s), self._renewal.pipeline(transaction=False) as pipe:
            for session_id, token in held:
                await self._renew(
                    keys=[keys.lease(session_id), keys.ACTIVE],
                    args=[token, self._ttl_ms, str(session_id)],
                    client=pipe,
                )
            renewed = await pipe.execute()
        lost: list[UUID] = []
        idle: list[UUID] = []
        for (session_id, token), ok in zip(held, renewed, strict=True):
            is_wanted = wanted(session_id) or self._pins[session_id] > 0
            if not ok:
                if self._held.get(session_id) == token:
                    del self._held[session_id]
                if is_wanted:
                    lost.append(session_id)
            elif not is_wanted:
                idle.append(session_id)
        return lost, idle

    async def stranded(self, limit: int) -> list[UUID]:
        """Sessions into which a process that died may have stored a message it never
        announced (see scripts.STRANDED); each is returned to one caller only."""
        found = await self._call(self._stranded, [keys.INFLIGHT], [limit])
        members = [raw.decode() if isinstance(raw, bytes) else raw for raw in found]
        return list({UUID(member.partition("|")[0]): None for member in members})

    async def orphans(self, limit: int) -> list[UUID]:
        """Sessions whose lease ran out without a release: their owner died."""
        found = await self._call(self._orphans, [keys.ACTIVE], [limit])
        return [UUID(raw.decode() if isinstance(raw, bytes) else raw) for raw in found]

    async def drop_all(self) -> None:
        """At shutdown: let every held session go at once, dirty or not (see DROP)."""
        held, self._held = self._held, {}
        if not held:
            return
        # Best effort: leases that stay expire within the TTL anyway.
        with contextlib.suppress(CoordinatorUnavailable):
            async with bounded(self._timeout_s), self._redis.pipeline(transaction=False) as pipe:
                for session_id, token in held.items():
                    await self._drop(
                        keys=[keys.lease(session_id), keys.ACTIVE],
                        args=[token, str(session_id)],
                        client=pipe,
                    )
                await pipe.execute()

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

    def _took(self, session_id: UUID, owner: str) -> bool:
        if owner.startswith(f"{self.node}:"):
            # Ours: a new claim, or the claim we hold (whose token stays what Redis holds).
            self._held[session_id] = owner
            return True
        return False

    @staticmethod
    def _keys(session_id: UUID) -> list[str]:
        return [keys.lease(session_id), keys.dirty(session_id), keys.ACTIVE, keys.INFLIGHT]

    async def _call(self, script: Any, keys_: list[str], args: list[Any]) -> Any:
        async with bounded(self._timeout_s):
            result = await script(keys=keys_, args=args)
        return result.decode() if isinstance(result, bytes) else result
