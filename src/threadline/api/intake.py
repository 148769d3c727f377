"""``Intake``: at most ``INTAKE_CONCURRENCY`` requests take their first step in one pass of
the event loop; the rest wait their turn in arrival order.

A request's first step is the costly part of its intake: the middlewares, routing, validation
and the route itself, up to the first time it waits (for the database, typically). Each takes
the loop only for a moment, but requests that arrive together are all ready together: a burst
of 200 on one worker stalled its loop for ~100 ms in one go (docs/performance.md), and every
stream and run of that worker stalled with it. With a bound, the burst is taken in slices of
``slots`` requests per pass, and between the slices the loop serves what else is ready.

A slot is held for that one pass only, never while a request waits: not for its reply (this
is no limit on requests in flight), and not for a database or Redis that is down (an outage
must still fail every request fast, each on its own timeout, not one slice after another).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from threadline import metrics


class Intake:
    """A pure ASGI middleware: each HTTP request takes one of ``slots`` slots for its first
    pass of the loop."""

    def __init__(self, app: ASGIApp, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"intake needs at least 1 slot, got {slots!r}")
        self.app = app
        self._slots = asyncio.Semaphore(slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._slots.locked():
            with metrics.INTAKE_WAITING.track_inprogress():
                await self._slots.acquire()
        else:
            await self._slots.acquire()  # free: returns at once, no yield to the loop
        # Given back at the next pass: by then this request has run until its first wait.
        asyncio.get_running_loop().call_soon(self._slots.release)
        await self.app(scope, receive, send)
