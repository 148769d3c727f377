"""``Intake`` driven as an ASGI app: how many requests start in one pass of the event loop, in
which order, and that a waiting request holds no slot. Passes are counted by a callback that
reschedules itself (it runs once per pass), so nothing here depends on timing;
tests/multiprocess/test_intake.py covers the routes through a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from threadline import metrics
from threadline.api.intake import Intake


@contextmanager
def counting_passes() -> Iterator[list[int]]:
    """``[n]``: how many passes of the loop have begun since entering."""
    loop = asyncio.get_running_loop()
    count = [0]
    handle: asyncio.Handle | None = None

    def tick() -> None:
        nonlocal handle
        count[0] += 1
        handle = loop.call_soon(tick)

    handle = loop.call_soon(tick)
    try:
        yield count
    finally:
        handle.cancel()


@dataclass
class Inner:
    """The app behind the middleware: notes the pass each request entered in, then waits
    for its own event, the way a request waits for its reply or a database."""

    passes: list[int]
    entered: list[tuple[str, int]] = field(default_factory=list)
    release: dict[str, asyncio.Event] = field(default_factory=dict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["name"]
        self.entered.append((name, self.passes[0]))
        await self.release.setdefault(name, asyncio.Event()).wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    pass


def request(intake: Intake, name: str) -> asyncio.Task[None]:
    scope: dict[str, Any] = {"type": "http", "name": name}
    return asyncio.create_task(intake(scope, receive, discard))


async def settle() -> None:
    """Let every task that can run, run (each step needs one pass of the loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_at_most_slots_requests_start_in_one_pass_in_arrival_order() -> None:
    with counting_passes() as passes:
        inner = Inner(passes)
        intake = Intake(inner, slots=2)
        tasks = [request(intake, name) for name in "abcde"]
        await settle()
        # Every request got in although none has finished: a waiting request holds no slot.
        assert [name for name, _ in inner.entered] == list("abcde")
        per_pass: dict[int, int] = {}
        for _, number in inner.entered:
            per_pass[number] = per_pass.get(number, 0) + 1
        assert max(per_pass.values()) == 2
        assert len(per_pass) == 3  # a b | c d | e
        for event in inner.release.values():
            event.set()
        await asyncio.gather(*tasks)


@pytest.mark.asyncio
async def test_a_failing_request_leaves_its_slot_free() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["name"])
        if scope["name"] == "failing":
            raise RuntimeError("boom")

    intake = Intake(app, slots=1)
    with pytest.raises(RuntimeError, match="boom"):
        await intake({"type": "http", "name": "failing"}, receive, discard)
    await settle()
    await intake({"type": "http", "name": "next"}, receive, discard)
    assert seen == ["failing", "next"]


@pytest.mark.asyncio
async def test_counts_the_requests_waiting_for_a_slot() -> None:
    waiting: list[float] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        waiting.append(metrics.INTAKE_WAITING._value.get())

    intake = Intake(app, slots=1)
    before = metrics.INTAKE_WAITING._value.get()
    await asyncio.gather(*(intake({"type": "http"}, receive, discard) for _ in "abc"))
    # The first went straight in; the second waited beside the third; the third alone.
    assert [w - before for w in waiting] == [0, 1, 0]
    assert metrics.INTAKE_WAITING._value.get() == before


@pytest.mark.asyncio
async def test_lets_anything_but_http_through_unbounded() -> None:
    seen: list[str] = []
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        await release.wait()

    intake = Intake(app, slots=1)
    tasks = [asyncio.create_task(intake({"type": "websocket"}, receive, discard)) for _ in "ab"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == ["websocket", "websocket"]
    release.set()
    await asyncio.gather(*tasks)


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1 slot"):
        Intake(Inner([0]), slots=0)
