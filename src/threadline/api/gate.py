"""The gate every keyed request passes: which key it bears (``Caller``), and its rate limit.

Keys come from ``THREADLINE_API_KEY`` (one admin key, compared in constant time) and from
``THREADLINE_API_KEYS_FILE`` (``threadline/keyfile.py``), found by the SHA-256 of the presented key.
The file is re-read when its modification time changes, checked at most every
``API_KEYS_RELOAD_S`` seconds, so ``threadline keys revoke`` takes effect on every process
within that time and without a restart. A file that fails to parse on reload keeps the keys
read before (logged): a half-edited file must not lock every client out, nor let anyone in.

Rate limits are a moving window of ``rate_limit_per_min`` requests per minute per key, by the
``limits`` library: in Redis (any ``THREADLINE_REDIS_MODE``) when Redis is configured, so the
limit holds across every process; in memory otherwise (one process). When Redis cannot
answer, a request is let through (logged): authentication does not depend on Redis, and an
outage of the limiter should not become an outage of the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from threadline.api.access import Caller
from threadline.config import Settings
from threadline.coordination.connection import limits_storage
from threadline.errors import ConfigError
from threadline.keyfile import ApiKey, hash_key, read_keys

log = logging.getLogger(__name__)

# The name the single THREADLINE_API_KEY goes by (it is an admin key, without a rate limit).
ENV_KEY_NAME = "THREADLINE_API_KEY"
# Prefix of the limiter's Redis keys: apart from the coordinator's ``threadline:`` keys.
REDIS_PREFIX = "threadline-ratelimit"
# One limiter call per keyed request with a limit, a few milliseconds each.
LIMITER_CONNECTIONS = 16


class Gate:
    def __init__(self, settings: Settings, storage: Storage) -> None:
        self._env_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self._path = settings.api_keys_file
        self._reload_s = settings.api_keys_reload_s
        self._by_hash: dict[str, ApiKey] = {}
        self._mtime: int | None = None
        self._checked = -math.inf
        self._limiter = MovingWindowRateLimiter(storage)
        self._timeout_s = settings.redis_timeout_s

    async def load(self) -> None:
        """Read the key file now; raises ``ConfigError`` (start-up fails on a bad file)."""
        if self._path is not None:
            self._mtime, keys = await asyncio.to_thread(_read, self._path)
            self._by_hash = {k.hash: k for k in keys}
            self._checked = time.monotonic()

    async def caller(self, key: str | None) -> Caller | None:
        """Who presents ``key``; None for no key or an unknown (or revoked) one."""
        if not key:
            return None
        if self._env_key is not None and hmac.compare_digest(key.encode(), self._env_key):
            return Caller("admin", None, ENV_KEY_NAME)
        if self._path is None:
            return None
        await self._reload_if_changed()
        # A dict lookup by digest: timing reveals at most which digests exist, and finding a
        # key from its digest is a SHA-256 preimage.
        entry = self._by_hash.get(hash_key(key))
        if entry is None:
            return None
        return Caller(entry.role, entry.user_id, entry.name, entry.rate_limit_per_min)

    async def admit(self, caller: Caller) -> int | None:
        """Count one request of ``caller``; None if admitted, else seconds until it would be."""
        if caller.rate_limit_per_min <= 0:
            return None
        item = RateLimitItemPerMinute(caller.rate_limit_per_min)
        try:
            async with asyncio.timeout(self._timeout_s):
                if await self._limiter.hit(item, caller.key_name):
                    return None
                stats = await self._limiter.get_window_stats(item, caller.key_name)
        except Exception as exc:  # the limiter's storage (Redis) is down: let the request in
            log.warning(
                "rate limiter unavailable, request of %r admitted: %r", caller.key_name, exc
            )
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def _reload_if_changed(self) -> None:
        assert self._path is not None
        now = time.monotonic()
        if now - self._checked < self._reload_s:
            return
        # Set first: concurrent requests do not all stat the file.
        self._checked = now
        try:
            mtime = await asyncio.to_thread(_mtime, self._path)
            if mtime == self._mtime:
                return
            self._mtime, keys = await asyncio.to_thread(_read, self._path)
        except ConfigError as exc:
            log.error("API keys file not reloaded, the keys read before stay: %s", exc)
            return
        self._by_hash = {k.hash: k for k in keys}
        log.info("API keys file reloaded: %d keys", len(keys))


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _read(path: Path) -> tuple[int | None, list[ApiKey]]:
    # The time before the content: a write in between is seen again at the next check.
    mtime = _mtime(path)
    return mtime, read_keys(path)


@contextlib.asynccontextmanager
async def open_gate(settings: Settings) -> AsyncIterator[Gate]:
    """The gate, with its limiter's storage (Redis connections of its own, closed on exit)."""
    async with contextlib.AsyncExitStack() as stack:
        storage: Storage
        if settings.uses_redis:
            # On the configured Redis topology, as the coordinator (coordination/connection.py).
            storage = await stack.enter_async_context(
                limits_storage(settings, REDIS_PREFIX, LIMITER_CONNECTIONS)
            )
        else:
            storage = MemoryStorage()
        try:
            gate = Gate(settings, storage)
            await gate.load()
            yield gate
        finally:
            if isinstance(storage, MemoryStorage) and storage.timer is not None:
                storage.timer.cancel()  # its expiry sweep, the one task the storage starts
