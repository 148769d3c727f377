"""The adaptive concurrency limit in a real server (uvicorn, in this process): runs that block
the event loop make it fall, healthy runs make it grow back, and both metrics show it.

Ordering is forced with events; the only time-dependent part is the loop lag itself, made
far larger (CPU bursts of 40 ms, each run several) than the 25 ms target set here, which a
loaded machine's own hiccups rarely reach.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from tests.api.test_metrics import scrape, value
from tests.apps import AppFactory
from threadline.agents import AgentSpec

RUNS = 8
BURSTS = 6
BURST_S = 0.040
LAG_TARGET_MS = 25


def burn(seconds: float) -> None:
    """Hold the CPU (and so the event loop) like a heavy agent step: no sleep, no I/O."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def concurrency(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/debug/metrics")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()["concurrency"]
    return found


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_the_limit_falls_while_runs_block_the_loop_and_grows_back_when_healthy(
    make_server: AppFactory,
) -> None:
    started = burnt = 0
    all_started, hog, all_burnt, finish = (asyncio.Event() for _ in range(4))

    async def hogging(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal started
        started += 1
        if started == RUNS:
            all_started.set()
        await hog.wait()
        for _ in range(BURSTS):
            burn(BURST_S)
            await asyncio.sleep(0)  # the loop (and its lag heartbeat) gets a turn
        nonlocal burnt
        burnt += 1
        if burnt == RUNS:
            all_burnt.set()
        await finish.wait()
        return ModelResponse(parts=[TextPart("done")])

    agent = AgentSpec(name="hog", model=FunctionModel(hogging, model_name="hog"))
    settings = {
        "adaptive_runs_min": 1,
        "adaptive_runs_max": RUNS,
        "adaptive_lag_target_ms": LAG_TARGET_MS,
    }
    async with make_server([agent], **settings) as (client, _):
        assert await concurrency(client) == {"limit": RUNS, "adaptive": True}
        hogs = [
            asyncio.create_task(
                client.post("/api/v1/agent/hog/run", json={"message_content": f"m{i}"})
            )
            for i in range(RUNS)
        ]
        await all_started.wait()  # every run holds a slot: the limit is what binds
        assert (await client.post("/debug/metrics/reset")).status_code == 200
        hog.set()
        await all_burnt.wait()
        # Every run has burnt its CPU and waits to finish: no latency sample yet, only lag
        # (the heartbeat that measured the last burst ran before this request was served).
        snapshot = (await client.get("/debug/metrics")).json()
        assert snapshot["loop_lag"]["max_ms"] > LAG_TARGET_MS
        fallen = snapshot["concurrency"]["limit"]
        _, samples = await scrape(client)
        assert fallen < RUNS
        assert value(samples, "threadline_concurrency_limit") == fallen

        finish.set()
        assert [(await h).status_code for h in hogs] == [200] * RUNS
        # Healthy runs with more callers than slots: the limit grows back to its maximum.
        limit = fallen
        for _ in range(50):
            replies = await asyncio.gather(
                *(
                    client.post("/api/v1/agent/echo/run", json={"message_content": "hi"})
                    for _ in range(2 * RUNS)
                )
            )
            assert [r.status_code for r in replies] == [200] * 2 * RUNS
            limit = (await concurrency(client))["limit"]
            if limit == RUNS:
                break
        assert limit == RUNS
        _, samples = await scrape(client)
        assert value(samples, "threadline_concurrency_limit") == RUNS


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_explicit_max_concurrent_runs_pins_the_limit(make_server: AppFactory) -> None:
    async with make_server(max_concurrent_runs=3) as (client, _):
        assert await concurrency(client) == {"limit": 3, "adaptive": False}
        _, samples = await scrape(client)
        assert value(samples, "threadline_concurrency_limit") == 3
