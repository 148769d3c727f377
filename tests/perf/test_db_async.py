"""The server under concurrent load on PostgreSQL never blocks its event loop.

A check, not a benchmark: there is no timing threshold. A real uvicorn server runs in this
process, on the test's loop, with the blocking guard of ``tests/conftest.py`` active
(blockbuster raises on any blocking call made on the loop from threadline's code). A handler
could swallow that error, so every detection is also recorded here, and the test asserts there
was none. A heartbeat task keeps beating during the load: the proof that the loop turned while
requests waited on PostgreSQL and the model.

Load: new sessions, bursts of three messages to one session (cancel-and-merge, the shielded
writes of a superseded run), and follow-ups by session id.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

import blockbuster.blockbuster as blockbuster_module
import httpx
import pytest
import uvicorn
from blockbuster import BlockBuster

from threadline.app import create_app
from threadline.config import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

CONCURRENCY = 40
NEW_SESSIONS = 120
BURSTS = 20
BURST_SIZE = 3


@pytest.fixture
def detections(monkeypatch: pytest.MonkeyPatch, blockbuster: BlockBuster | None) -> list[str]:
    """Every blocking call the guard catches, even if the code that made it hides the error."""
    assert blockbuster is not None, "the blocking guard must be active for this test"
    # FastAPI reads each endpoint's source location (os.stat, open) on its first request, for
    # error messages, and caches it: once per endpoint per process, never per request.
    for name, function in blockbuster.functions.items():
        if name.startswith(("os.", "io.", "builtins.open")):
            function.can_block_in("fastapi/routing.py", {"_extract_endpoint_context"})
    found: list[str] = []

    class RecordedBlockingError(blockbuster_module.BlockingError):
        def __init__(self, func: str) -> None:
            caller = " <- ".join(
                f"{f.filename.rpartition('/')[2]}:{f.lineno} {f.name}"
                for f in reversed(traceback.extract_stack(limit=12)[:-1])
            )
            found.append(f"{func} in {caller}")
            super().__init__(func)

    # blockbuster's wrappers look the class up in their module's globals when they raise.
    monkeypatch.setattr(blockbuster_module, "BlockingError", RecordedBlockingError)
    return found


@pytest.fixture(params=["local", "redis"])
def coordinator(request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("redis_url")) if request.param == "redis" else None


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """A real uvicorn server for ``settings`` on a free loopback port; yields its base URL."""
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def heartbeat(beats: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        beats.append(loop.time())
        await asyncio.sleep(0.005)


async def test_concurrent_turns_never_block_the_event_loop(
    pg_url: str, coordinator: str | None, detections: list[str]
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=pg_url, redis_url=coordinator, echo_delay_ms=20
    )
    user = f"perf-{uuid.uuid4().hex}"
    limit = asyncio.Semaphore(CONCURRENCY)
    beats: list[float] = []
    failures: list[str] = []
    session_ids: set[str] = set()

    async with serving(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def turn(prompt: str, **where: Any) -> None:
            async with limit:
                response = await client.post(
                    "/api/v1/agent/echo/run",
                    json={"message_content": prompt, "user_id": user, **where},
                )
            body = response.json()
            if response.status_code != 200 or prompt not in body.get("message", ""):
                failures.append(f"{response.status_code}: {body}")
                return
            session_ids.add(body["session_id"])

        async def burst(index: int) -> None:
            name = f"burst-{index}"
            await asyncio.gather(
                *(turn(f"<{name}:{k}>", session_name=name) for k in range(BURST_SIZE))
            )

        beating = asyncio.create_task(heartbeat(beats))
        try:
            await asyncio.gather(
                *(turn(f"<new-{i}>", session_name=f"new-{i}") for i in range(NEW_SESSIONS)),
                *(burst(i) for i in range(BURSTS)),
            )
            await asyncio.gather(
                *(turn(f"<again-{s}>", session_id=s) for s in sorted(session_ids)[:CONCURRENCY])
            )
            metrics = (await client.get("/debug/metrics")).json()
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            for session_id in session_ids:
                await client.delete(f"/api/v1/sessions/{session_id}", params={"user_id": user})

    assert detections == [], f"blocking calls on the event loop: {detections}"
    assert failures == []
    assert len(beats) > 1, "the heartbeat never ran while requests were in flight"
    assert metrics["loop_lag"]["samples"] > 0
