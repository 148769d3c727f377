"""``Deliverer``: sends the webhook outbox, at least once, from any number of processes.

One per process, owned by the app's lifespan. Its loop claims due deliveries with a lease
(``Store.claim_deliveries``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so each row has one
sender at a time across processes), sends each in a task of its own, at most
``WEBHOOK_CONCURRENCY`` at once, and records the outcome under that lease::

    pending ──claim──▶ delivering ──2xx──────────────────────────────▶ delivered
       ▲                  │  │
       │                  │  └─ other status, timeout, refused: due again after a back-off,
       └──────────────────┘     or ``failed`` once WEBHOOK_MAX_AGE_S has passed
       lease expired (the sender was killed mid-send): claimed again

A sender killed mid-send leaves its lease to expire (twice the send timeout plus a second),
after which any process sends the delivery again: a receiver may see a delivery twice and
dedupes on its id. The loop wakes when this process wrote a delivery (``wake``) and polls every
``WEBHOOK_POLL_INTERVAL_S`` for the others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from threadline import metrics
from threadline.config import Settings
from threadline.delivery.signing import signed_headers
from threadline.errors import StoreUnavailable
from threadline.store import Attempt, Delivery, Store

log = logging.getLogger(__name__)


class Deliverer:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert settings.webhook_secret is not None, "deliveries are only ever sent signed"
        self._store = store
        self._secret = settings.webhook_secret.get_secret_value()
        self._timeout = settings.webhook_timeout_s
        # Longer than any send (bounded by the timeout) plus its record, so that a live
        # sender never loses a lease to another process mid-send.
        self._lease_s = 2 * settings.webhook_timeout_s + 1
        self._max_age_s = settings.webhook_max_age_s
        self._poll_s = settings.webhook_poll_interval_s
        self._concurrency = settings.webhook_concurrency
        self._backoff = wait_exponential_jitter(
            initial=settings.webhook_retry_initial_s,
            max=settings.webhook_retry_max_s,
            jitter=settings.webhook_retry_initial_s,
        )
        # Redirects are not followed: a receiver must not be able to send us elsewhere
        # (an internal address the allowed-hosts list keeps out).
        self._client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s, follow_redirects=False, transport=transport
        )
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed_attempts = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, store: Store, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> AsyncIterator[Deliverer]:
        deliverer = cls(store, settings, transport)
        deliverer._loop = asyncio.create_task(deliverer._run())
        try:
            yield deliverer
        finally:
            await deliverer.aclose()

    def wake(self) -> None:
        """This process just wrote deliveries: look for due ones now."""
        self._wake.set()

    def metrics(self) -> dict[str, Any]:
        return {
            "sending": len(self._sending),
            "delivered": self.sent,
            "failed_attempts": self.failed_attempts,
        }

    async def aclose(self) -> None:
        tasks = [t for t in (self._loop, *self._sending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            free = self._concurrency - len(self._sending)
            claimed: list[Delivery] = []
            if free > 0:
                owner = f"{self._name}:{uuid.uuid4().hex[:12]}"
                try:
                    claimed = await self._store.claim_deliveries(owner, free, self._lease_s)
                except StoreUnavailable as exc:
                    log.warning("webhook sender could not claim deliveries: %s", exc)
                except Exception:
                    log.exception("webhook sender could not claim deliveries")
                for delivery in claimed:
                    task = asyncio.create_task(self._send(delivery, owner))
                    self._sending.add(task)
                    task.add_done_callback(self._done)
                if claimed and len(claimed) == free:
                    continue  # a full batch: more may be due already
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if len(self._sending) == self._concurrency - 1:
            # Every slot was taken, so the loop waits for one: there may be more due.
            self._wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook send failed unexpectedly", exc_info=exc)

    async def _send(self, delivery: Delivery, owner: str) -> None:
        body = delivery.body.encode()
        headers = signed_headers(self._secret, str(delivery.id), body, int(time.time()))
        attempt: Attempt
        try:
            # One bound for the whole attempt: httpx's timeout applies to each read, and a
            # receiver trickling bytes must not hold a sender (and its lease) forever.
            async with asyncio.timeout(self._timeout):
                # The response body is never read: only the status matters.
                async with self._client.stream(
                    "POST", delivery.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
            metrics.WEBHOOK_ATTEMPTS.labels(str(status)).inc()
            if 200 <= status < 300:
                attempt = Attempt(True, status)
            else:
                attempt = self._retry(delivery, f"HTTP {status}", status)
        except TimeoutError:
            metrics.WEBHOOK_ATTEMPTS.labels("timeout").inc()
            attempt = self._retry(delivery, f"no response within {self._timeout:g}s")
        except httpx.HTTPError as exc:
            metrics.WEBHOOK_ATTEMPTS.labels("error").inc()
            attempt = self._retry(delivery, f"{type(exc).__name__}: {exc}"[:500])
        except asyncio.CancelledError:
            # Shutting down mid-send: make it due again now rather than when the lease runs
            # out. The receiver may have had it; it will dedupe.
            stopped = Attempt(False, None, "the sender shut down mid-send", 0, self._max_age_s)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await asyncio.shield(self._store.settle_delivery(delivery.id, owner, stopped))
            raise
        if attempt.delivered:
            self.sent += 1
        else:
            self.failed_attempts += 1
            log.info(
                "delivery %s to %s, attempt %d: %s",
                delivery.id,
                delivery.url,
                delivery.attempts,
                attempt.error,
            )
        try:
            settled = await self._store.settle_delivery(delivery.id, owner, attempt)
        except StoreUnavailable as exc:
            # Its lease runs out and it is sent again: at least once, never lost.
            log.warning("delivery %s: could not record attempt: %s", delivery.id, exc)
            return
        if not settled:
            log.warning("delivery %s: lease lost mid-send; another sender has it", delivery.id)

    def _retry(self, delivery: Delivery, error: str, status: int | None = None) -> Attempt:
        state = RetryCallState(AsyncRetrying(), None, (), {})
        state.attempt_number = delivery.attempts
        return Attempt(False, status, error, self._backoff(state), self._max_age_s)
