"""``Intake`` driven as an ASGI app: which requests get in, in which order, and when their
slots come back. Events order everything; tests/multiprocess/test_intake.py covers the routes
through a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from threadline import metrics
from threadline.api.intake import Intake, stored_hook

Script = Callable[[Scope, Send], Awaitable[None]]


@dataclass
class Inner:
    """The app behind the middleware: each request runs the script the test gave it."""

    entered: list[str] = field(default_factory=list)
    arrived: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.entered.append(scope["name"])
        await self.arrived.put(scope["name"])
        script: Script = scope["script"]
        await script(scope, send)


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    pass


def request(intake: Intake, name: str, script: Script) -> asyncio.Task[None]:
    scope: dict[str, Any] = {"type": "http", "name": name, "script": script}
    return asyncio.create_task(intake(scope, receive, discard))


def held_until(event: asyncio.Event) -> Script:
    async def script(scope: Scope, send: Send) -> None:
        await event.wait()

    return script


async def respond(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})


async def settle() -> None:
    """Let every task that can run, run (each step needs one pass of the loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_admits_slots_requests_and_the_rest_in_arrival_order() -> None:
    inner = Inner()
    intake = Intake(inner, slots=2)
    gates = {name: asyncio.Event() for name in "abcde"}
    tasks = [request(intake, name, held_until(gates[name])) for name in "abcde"]
    await settle()
    assert inner.entered == ["a", "b"]
    gates["b"].set()
    assert await inner.arrived.get() == "a"
    assert await inner.arrived.get() == "b"
    assert await inner.arrived.get() == "c"
    await settle()
    assert inner.entered == ["a", "b", "c"]
    for name in "acde":
        gates[name].set()
    await asyncio.gather(*tasks)
    assert inner.entered == ["a", "b", "c", "d", "e"]


@pytest.mark.asyncio
async def test_a_slot_comes_back_when_the_response_starts_not_when_it_ends() -> None:
    inner = Inner()
    intake = Intake(inner, slots=1)
    end_stream = asyncio.Event()

    async def stream(scope: Scope, send: Send) -> None:
        await respond(send)
        await end_stream.wait()  # a stream open for as long as it likes

    streaming = request(intake, "stream", stream)
    later = asyncio.Event()
    after = request(intake, "after", held_until(later))
    await settle()
    assert inner.entered == ["stream", "after"]
    later.set()
    end_stream.set()
    await asyncio.gather(streaming, after)


@pytest.mark.asyncio
async def test_a_stored_message_gives_the_slot_back_once() -> None:
    inner = Inner()
    intake = Intake(inner, slots=1)
    reply = asyncio.Event()

    async def wait_for_reply(scope: Scope, send: Send) -> None:
        hook = stored_hook(Request(scope))
        assert hook is not None
        hook(None)  # type: ignore[arg-type]  # the message id is not the middleware's business
        hook(None)  # type: ignore[arg-type]  # a second call must not free a second slot
        await reply.wait()
        await respond(send)

    waiting = request(intake, "waiting", wait_for_reply)
    gates = {name: asyncio.Event() for name in ("second", "third")}
    second = request(intake, "second", held_until(gates["second"]))
    third = request(intake, "third", held_until(gates["third"]))
    await settle()
    # One slot: the waiting request gave it back, the second took it, the third waits.
    assert inner.entered == ["waiting", "second"]
    reply.set()  # the waiting request's response start frees nothing more
    await waiting
    await settle()
    assert inner.entered == ["waiting", "second"]
    gates["second"].set()
    gates["third"].set()
    await asyncio.gather(second, third)
    assert inner.entered == ["waiting", "second", "third"]


@pytest.mark.asyncio
async def test_a_failing_request_gives_its_slot_back() -> None:
    inner = Inner()
    intake = Intake(inner, slots=1)

    async def fail(scope: Scope, send: Send) -> None:
        raise RuntimeError("boom")

    failing = request(intake, "failing", fail)
    with pytest.raises(RuntimeError, match="boom"):
        await failing
    done = asyncio.Event()
    done.set()
    await request(intake, "next", held_until(done))
    assert inner.entered == ["failing", "next"]


@pytest.mark.asyncio
async def test_counts_the_requests_waiting_for_a_slot() -> None:
    inner = Inner()
    intake = Intake(inner, slots=1)
    before = metrics.INTAKE_WAITING._value.get()
    gates = {name: asyncio.Event() for name in "abc"}
    tasks = [request(intake, name, held_until(gates[name])) for name in "abc"]
    await settle()
    assert metrics.INTAKE_WAITING._value.get() - before == 2
    for name in "abc":
        gates[name].set()
    await asyncio.gather(*tasks)
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
    await settle()
    assert seen == ["websocket", "websocket"]
    release.set()
    await asyncio.gather(*tasks)


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1 slot"):
        Intake(Inner(), slots=0)
