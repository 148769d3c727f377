"""A fake OpenAI-compatible model server for the benchmark: Chat Completions with a fixed delay.

    python scripts/benchmarks/fake_openai_server.py --port 8100 --delay-ms 50

``POST /v1/chat/completions`` answers ``fake: <last user message>`` after ``--delay-ms``: as one
JSON body, or with ``"stream": true`` as Server-Sent Events in OpenAI's chunk format (the same
as ``tests/fake_openai.py``): a role chunk at once, then the reply in word chunks (at most
``STREAM_CHUNKS``, as the echo model streams) with the delay spread evenly before them, a
``finish_reason`` chunk, the usage chunk when ``stream_options.include_usage`` asks for it,
and ``[DONE]``. So the first token comes ``delay / chunks`` after the request, the last one
after ``delay``, as with the echo model.

It runs in a process of its own, a bare ASGI app on uvicorn (uvloop and httptools when
installed) with the constant parts of every body prebuilt, so that it costs little CPU per
request and does not bound what it serves. ``GET /stats`` (and ``POST /stats/reset``, which
also returns them) gives what the benchmark needs to show it: requests served and the service
time of each (request received to last byte written), whose mean should stay at the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import time
from typing import Any

import uvicorn

STREAM_CHUNKS = 8
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def chunks(text: str, at_most: int = STREAM_CHUNKS) -> list[str]:
    """``text`` cut between words into at most ``at_most`` pieces (the echo model's rule)."""
    words = re.findall(r"\s*\S+\s*", text) or [text]
    size = -(-len(words) // at_most)
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


class Stats:
    def __init__(self) -> None:
        self.service_ms: list[float] = []
        # How many asked for a streamed answer: shows whether a server streams its provider
        # call when its own caller streams.
        self.streamed = 0
        self.in_flight = 0
        self.in_flight_max = 0

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self.service_ms)

        def pct(p: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2)

        return {
            "requests": len(ordered),
            "streamed": self.streamed,
            "service_mean_ms": round(sum(ordered) / len(ordered), 2) if ordered else None,
            "service_p50_ms": pct(50),
            "service_p99_ms": pct(99),
            "service_max_ms": round(ordered[-1], 2) if ordered else None,
            "in_flight_max": self.in_flight_max,
        }

    def reset(self) -> None:
        self.service_ms.clear()
        self.streamed = 0
        self.in_flight_max = self.in_flight


class FakeOpenAI:
    """The ASGI app."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.stats = Stats()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        path = scope["path"]
        if path.endswith("/chat/completions") and scope["method"] == "POST":
            await self._completion(receive, send)
        elif path == "/stats":
            body = self.stats.snapshot()
            if scope["method"] == "POST":
                self.stats.reset()
            await _respond(send, 200, json.dumps(body).encode())
        elif path == "/health":
            await _respond(send, 200, b'{"status":"ok"}')
        else:
            await _respond(send, 404, b'{"error":{"message":"not found"}}')

    async def _completion(self, receive: Any, send: Any) -> None:
        received = time.perf_counter()
        stats = self.stats
        stats.in_flight += 1
        stats.in_flight_max = max(stats.in_flight_max, stats.in_flight)
        try:
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body"):
                    break
            body = json.loads(raw)
            last = next(m for m in reversed(body["messages"]) if m["role"] == "user")
            content = last["content"]
            text = content if isinstance(content, str) else json.dumps(content)
            model = json.dumps(body.get("model", "fake"))
            if body.get("stream"):
                stats.streamed += 1
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await self._stream(send, model, f"fake: {text}", usage)
            else:
                await asyncio.sleep(self.delay_s)
                await _respond(send, 200, _completion_body(model, f"fake: {text}"))
        finally:
            stats.in_flight -= 1
        stats.service_ms.append((time.perf_counter() - received) * 1000)

    async def _stream(self, send: Any, model: str, reply: str, usage: bool) -> None:
        head = (
            f'data: {{"id":"chatcmpl-fake","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{model},"choices":'
        )

        async def chunk(choices: str, tail: str = "") -> None:
            line = f"{head}{choices}{tail}}}\n\n".encode()
            await send({"type": "http.response.body", "body": line, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await chunk('[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]')
        pieces = chunks(reply)
        for piece in pieces:
            await asyncio.sleep(self.delay_s / len(pieces))
            delta = json.dumps(piece)
            await chunk(f'[{{"index":0,"delta":{{"content":{delta}}},"finish_reason":null}}]')
        await chunk('[{"index":0,"delta":{},"finish_reason":"stop"}]')
        if usage:
            await chunk("[]", f',"usage":{json.dumps(USAGE)}')
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _completion_body(model: str, reply: str) -> bytes:
    return (
        f'{{"id":"chatcmpl-fake","object":"chat.completion","created":{int(time.time())},'
        f'"model":{model},"choices":[{{"index":0,"message":{{"role":"assistant",'
        f'"content":{json.dumps(reply)}}},"finish_reason":"stop"}}],'
        f'"usage":{json.dumps(USAGE)}}}'
    ).encode()


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="per completion")
    args = parser.parse_args()
    app = FakeOpenAI(args.delay_ms / 1000)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Hundreds of keep-alive connections from each server under test, all reused.
        backlog=4096,
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
