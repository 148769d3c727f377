"""A small fake OpenAI-compatible server on 127.0.0.1, so the real provider client runs.

``/v1/chat/completions`` answers ``fake: <last user message>``: as one JSON body, or with
``"stream": true`` as Server-Sent Events in OpenAI's chunk format, a chunk per word (then the
usage chunk if ``stream_options.include_usage``, then ``[DONE]``). A request whose last user
message is exactly ``HOLD`` is held open until the client goes away (streamed, after its first
chunk of text); the server records that disconnect, which is how tests prove a cancelled run
really closed its provider request. ``scripted`` holds raw answers that replace the usual
one, a request each in order: a completion as it is, or a list of chunks as one event each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def words(text: str) -> list[str]:
    """``text`` cut after each word's trailing space: the pieces a streamed reply comes in."""
    return re.findall(r"\s*\S+\s*", text) or [text]


@dataclass
class FakeOpenAI:
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Each request's headers, names lower-cased: what the client sent the host it was given.
    headers: list[dict[str, str]] = field(default_factory=list)
    # Each request's method, path and query string.
    targets: list[str] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    # Raw answers for the next requests, in order: a dict is sent as the JSON body, a list as
    # Server-Sent Events (one per item, named by its ``type`` if it has one, then ``[DONE]``),
    # whatever the path: so Anthropic's format too. What no real server would send, as well.
    scripted: list[Any] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        self.requests.append(body)
        self.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        query = scope["query_string"].decode()
        self.targets.append(f"{scope['method']} {scope['path']}" + (f"?{query}" if query else ""))
        if self.scripted:
            await self._send_scripted(self.scripted.pop(0), send)
            return
        last = next(m for m in reversed(body["messages"]) if m["role"] == "user")
        text = last["content"] if isinstance(last["content"], str) else json.dumps(last["content"])
        if body.get("stream"):
            await self._stream(body, text, receive, send)
            return
        if text == "HOLD":
            await self._hold(receive)
            return
        reply = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"fake: {text}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
        payload = json.dumps(reply).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _stream(self, body: dict[str, Any], text: str, receive: Receive, send: Send) -> None:
        created = int(time.time())

        async def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "choices": choices,
                "usage": usage,
            }
            line = f"data: {json.dumps(data)}\n\n".encode()
            await send({"type": "http.response.body", "body": line, "more_body": True})

        def delta(content: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": content, "finish_reason": finish}]

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await chunk(delta({"role": "assistant", "content": ""}))
        pieces = words(f"fake: {text}")
        for index, piece in enumerate(pieces):
            await chunk(delta({"content": piece}))
            if index == 0 and text == "HOLD":
                # Mid-reply: the client has started reading the stream.
                await self._hold(receive)
                return
        await chunk(delta({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await chunk([], USAGE)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def _send_scripted(self, answer: Any, send: Send) -> None:
        streamed = isinstance(answer, list)
        kind = b"text/event-stream" if streamed else b"application/json"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]}
        )
        if streamed:
            # Anthropic's events are named by their type; OpenAI's chunks have none.
            events = [
                "".join(
                    [
                        f"event: {item['type']}\n" if "type" in item else "",
                        f"data: {json.dumps(item)}\n\n",
                    ]
                )
                for item in answer
            ]
            payload = "".join([*events, "data: [DONE]\n\n"]).encode()
        else:
            payload = json.dumps(answer).encode()
        await send({"type": "http.response.body", "body": payload})

    async def _hold(self, receive: Receive) -> None:
        self.held.set()
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()


@contextlib.asynccontextmanager
async def running_fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    config = uvicorn.Config(fake, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    fake.port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.should_exit = True
        await task
