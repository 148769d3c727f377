"""``Intake``: at most ``INTAKE_CONCURRENCY`` requests in intake at once; the rest wait their
turn in arrival order.

Intake is what a request costs the event loop before it waits for anything but the database:
the middlewares, routing, validation, the session lookup, storing the message. Each request
takes the loop only for a moment, but requests that arrive together are all ready together: a
burst of 200 on one worker stalled its loop for ~110 ms in one go (docs/performance.md), and
every stream and run of that worker stalled with it. With a bound, the burst is taken in
slices of ``slots`` requests, and between the slices the loop serves what else is ready.

A slot is given back when the response starts, or earlier, when a route that goes on to wait
for a run says its message is stored (``stored_hook``): waiting for a reply is not intake, and
holding a slot through it would turn this bound into a limit on requests in flight.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline import metrics
from threadline.coordination.base import OnStored

# Where a request in intake finds the hook that gives its slot back (``stored_hook``).
SCOPE_KEY = "threadline.intake_done"


class Intake:
    """A pure ASGI middleware: HTTP requests queue for one of ``slots`` slots."""

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
        held = True

        def done(*_: object) -> None:
            nonlocal held
            if held:
                held = False
                self._slots.release()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                done()
            await send(message)

        scope[SCOPE_KEY] = done
        try:
            await self.app(scope, receive, sending)
        finally:
            done()


def stored_hook(request: Request) -> OnStored | None:
    """The ``on_stored`` of a route that waits for a run: the stored message ends its intake.

    ``None`` when intake is unbounded (``INTAKE_CONCURRENCY=0``)."""
    hook: OnStored | None = request.scope.get(SCOPE_KEY)
    return hook
