"""``owned``: one background task that lives exactly as long as a ``with`` block.

The loops that sample (``monitor.py``'s heartbeat, ``metrics.py``'s gauges) each have one
owner, the app's lifespan, which enters their ``running()``; this is what those share: start
the task on entry, and on exit cancel it and wait for it, so nothing of it outlives its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def owned(loop: Coroutine[Any, Any, None], *, name: str) -> AsyncIterator[None]:
    task = asyncio.create_task(loop, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
