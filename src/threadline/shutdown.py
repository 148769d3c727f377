"""``draining_on_exit``: start draining the coordinator the moment the server is told to stop.

uvicorn's shutdown on SIGTERM or SIGINT runs in this order: stop accepting connections, wait
up to ``timeout_graceful_shutdown`` for the requests in flight, *cancel* those still running,
and only then run the app's lifespan shutdown, where the coordinator would drain. A request
waiting for its reply therefore got uvicorn's bare 500 (its task cancelled), never the
documented 503 ``shutting_down`` that the drain gives every caller it cannot answer.

So the app hears the signal itself: the handler uvicorn installed stays in charge, and ours,
chained in front of it, also wakes a task that drains the coordinator (runs in flight get
``SHUTDOWN_GRACE_S``, the callers still waiting then get 503). Their responses go out while
uvicorn is still waiting for them; ``cli.py`` gives it that grace plus a margin.

Only a handler a server installed is chained: in-process uses (tests, an embedding
application) keep their signals untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any, Protocol

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Handler = Callable[[int, FrameType | None], Any]


class Drains(Protocol):
    async def drain(self, grace: float) -> None: ...


@contextlib.asynccontextmanager
async def draining_on_exit(coordinator: Drains, grace: float) -> AsyncIterator[None]:
    """Within the block, an exit signal starts ``coordinator.drain(grace)``; on leaving, a
    drain under way is waited for (the resources it uses close after it), else forgotten."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    async def drain_when_signalled() -> None:
        await signalled.wait()
        await coordinator.drain(grace)

    task = asyncio.create_task(drain_when_signalled(), name="threadline-drain")
    restore = _chain_exit_signals(lambda: loop.call_soon_threadsafe(signalled.set))
    try:
        yield
    finally:
        restore()
        if signalled.is_set():
            await task
        else:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _chain_exit_signals(callback: Callable[[], object]) -> Callable[[], None]:
    """Put a handler that calls ``callback`` in front of the server's own exit handlers;
    return what puts theirs back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach the main thread only
    replaced: dict[signal.Signals, Handler] = {}
    for number in EXIT_SIGNALS:
        previous = signal.getsignal(number)
        if not callable(previous) or previous is signal.default_int_handler:
            continue  # nobody serving handles it: not ours to change

        def chained(signum: int, frame: FrameType | None, previous: Handler = previous) -> None:
            callback()
            previous(signum, frame)

        signal.signal(number, chained)
        replaced[number] = previous

    def restore() -> None:
        for number, previous in replaced.items():
            signal.signal(number, previous)

    return restore
