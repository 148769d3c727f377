"""Event-loop lag monitor: a heartbeat that measures how late the loop wakes it up.

A blocked loop delays every request; this makes the delay visible at /metrics (a histogram) and at
/debug/metrics, which the benchmark reads to show that threadline's loop never stalls under load.
Each sample also goes to ``on_lag``: the turn queue's adaptive concurrency limit shrinks when the
loop lags (``queue/limit.py``), so this heartbeat is the one task that samples lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from threadline import metrics
from threadline.tasks import owned

log = logging.getLogger(__name__)


class LoopLagMonitor:
    def __init__(
        self,
        interval_s: float = 0.01,
        window: int = 100_000,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        self._interval = interval_s
        self._on_lag = on_lag
        self._lags: deque[float] = deque(maxlen=window)

    def reset(self) -> None:
        self._lags.clear()

    def snapshot(self) -> dict[str, Any]:
        lags = sorted(self._lags)
        if not lags:
            return {"samples": 0, "max_ms": 0.0, "p99_ms": 0.0}
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        return {"samples": len(lags), "max_ms": lags[-1] * 1000, "p99_ms": p99 * 1000}

    async def _beat(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self._interval)
            lag = max(0.0, time.perf_counter() - before - self._interval)
            self._lags.append(lag)
            metrics.LOOP_LAG.observe(lag)
            if self._on_lag is not None:
                try:
                    self._on_lag(lag)
                except Exception:
                    # A broken listener must not stop the measurement the metrics rely on.
                    log.exception("loop lag listener failed")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopLagMonitor]:
        async with owned(self._beat(), name="threadline-loop-lag"):
            yield self
