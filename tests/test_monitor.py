"""The loop-lag heartbeat: every sample reaches its listener, and a listener that fails does
not stop the measurement."""

from __future__ import annotations

import asyncio

import pytest

from threadline.monitor import LoopLagMonitor

pytestmark = pytest.mark.timeout(10)


async def test_every_lag_sample_reaches_the_listener_even_after_it_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[float] = []
    enough = asyncio.Event()

    def listener(lag: float) -> None:
        heard.append(lag)
        if len(heard) == 1:
            raise RuntimeError("listener bug")
        if len(heard) == 3:
            enough.set()

    monitor = LoopLagMonitor(interval_s=0.001, on_lag=listener)
    async with monitor.running():
        await enough.wait()
        snapshot = monitor.snapshot()

    assert snapshot["samples"] >= 3
    assert all(lag >= 0 for lag in heard)
    assert "loop lag listener failed" in caplog.text
