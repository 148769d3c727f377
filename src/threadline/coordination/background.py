"""Background submission: store a message and return its id without waiting for the answer.

No task waits for the answer on the caller's behalf, on purpose: once stored, a message belongs
to the queue, which runs it whether or not anyone waits (``TurnQueue.submit``: the insert and
the run are the queue's tasks, and a caller that goes away cancels neither). With Redis the
same holds on every path: the owner runs a nudged message regardless of the waiting caller,
an owner that dies leaves its sessions to the watchdog (``threadline:active:{i}``), and an insert
whose process dies before the nudge is found through ``threadline:inflight:{i}``. The answer
reaches the client through ``GET /messages/{id}`` and the webhook outbox instead.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from threadline.coordination.base import Coordinator, TurnRequest


async def submit_in_background(coordinator: Coordinator, request: TurnRequest) -> UUID:
    """Return the message id once the insert committed; raise what ``submit`` raises before
    storing (``SessionBusy``, ``QueueFull``, ``Unavailable``...)."""
    stored: asyncio.Future[UUID] = asyncio.get_running_loop().create_future()

    def on_stored(message_id: UUID) -> None:
        if not stored.done():
            stored.set_result(message_id)

    submit = asyncio.ensure_future(coordinator.submit(request, on_stored))
    either: set[asyncio.Future[Any]] = {submit, stored}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not submit.done():
            # Stored (or we are cancelled): stop waiting for the answer. This is what a
            # blocking caller that disconnects does; the queue goes on with the message.
            submit.cancel()
            await asyncio.wait({submit})
    if stored.done():
        if not submit.cancelled():
            submit.exception()  # retrieved: the answer, or an error after storing, is not ours
        return stored.result()
    await submit  # failed before storing: raise its error
    raise AssertionError("submit answered a message it never stored")
