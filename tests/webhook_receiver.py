"""A real webhook receiver on 127.0.0.1 for the webhook tests, scripted per request.

Each request takes the next action of ``script``: ``"fail"`` answers 500, ``"hang"`` holds the
request open until the sender goes away (its timeout, or its process killed), ``"ok"`` answers
200 (also once the script is used up). Every request is recorded and announced on
``arrivals``, so a test waits for the next one instead of sleeping.

Its URLs start with a token of its own: the PostgreSQL test database is shared, and a delivery
another test left owed to a receiver long gone may be sent to a port this one reuses; such a
request gets 404 and is neither recorded nor announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from threadline.delivery.signing import ID_HEADER, verify

Action = Literal["fail", "hang", "ok"]


@dataclass(frozen=True)
class Received:
    path: str
    headers: Headers
    body: bytes
    action: Action

    @property
    def payload(self) -> Any:
        return json.loads(self.body)

    @property
    def delivery_id(self) -> str:
        return self.headers[ID_HEADER]

    def verifies(self, secret: str) -> bool:
        return verify(secret, self.headers, self.body)


@dataclass
class WebhookReceiver:
    script: list[Action] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    arrivals: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    port: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}/{self.token}{path}"

    async def next(self) -> Received:
        return await self.arrivals.get()

    def ids(self) -> set[str]:
        return {r.delivery_id for r in self.received}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        prefix = f"/{self.token}/"
        if not scope["path"].startswith(prefix):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        action: Action = self.script.pop(0) if self.script else "ok"
        path = scope["path"].removeprefix(prefix[:-1])
        got = Received(path, Headers(scope=scope), body, action)
        self.received.append(got)
        await self.arrivals.put(got)
        if action == "hang":
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        status = 500 if action == "fail" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@contextlib.asynccontextmanager
async def running_receiver(script: Iterable[Action] = ()) -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(list(script))
    config = uvicorn.Config(
        receiver,
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    receiver.port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.should_exit = True
        await task
