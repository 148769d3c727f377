"""The client: randomized bursts over many sessions to random processes, every request recorded.

A fixed number of workers each take the session that has waited longest, send it a burst of
1-5 concurrent messages (each to a random process, each with content no other message has),
wait for every answer, and put the session back. So every session gets bursts in turn, one
burst at a time per session, while many sessions are in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import httpx

from tests.chaos.history import History, Request, RequestKind

AGENT = "echo"


@dataclass(frozen=True, slots=True)
class LoadConfig:
    workers: int = 16
    max_burst: int = 5
    # A request still unanswered after this long is recorded as hung ("timeout").
    request_timeout_s: float = 30.0
    max_pause_s: float = 0.2


class Client:
    """Sends messages and records each one in the history, whatever its outcome."""

    def __init__(self, urls: Sequence[str], history: History, timeout_s: float) -> None:
        self.urls = list(urls)
        self.history = history
        self._numbers = itertools.count(1)
        # No keep-alive: a connection pooled to a process that was since killed would fail a
        # later request that has nothing to do with the kill.
        self._http = httpx.AsyncClient(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def content(self, kind: RequestKind, session_id: UUID, note: str = "") -> str:
        return f"{kind} #{next(self._numbers)} of {str(session_id)[:8]} {note}".strip()

    async def send(
        self, session_id: UUID, content: str, server: int, kind: RequestKind = "load"
    ) -> Request:
        body = {"message_content": content, "session_id": str(session_id)}
        start = time.time()
        try:
            response = await self._http.post(
                f"{self.urls[server]}/api/v1/agent/{AGENT}/run", json=body
            )
        except httpx.TimeoutException:
            request = Request(
                session_id, content, server, start, time.time(), None, error="timeout", kind=kind
            )
        except httpx.TransportError as exc:
            request = Request(
                session_id,
                content,
                server,
                start,
                time.time(),
                None,
                error=type(exc).__name__,
                kind=kind,
            )
        else:
            request = _recorded(response, session_id, content, server, start, kind)
        self.history.requests.append(request)
        return request


def _recorded(
    response: httpx.Response,
    session_id: UUID,
    content: str,
    server: int,
    start: float,
    kind: RequestKind,
) -> Request:
    end = time.time()
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.is_success:
        return Request(
            session_id,
            content,
            server,
            start,
            end,
            response.status_code,
            run_id=UUID(body["run_id"]),
            message_ids=tuple(UUID(i) for i in body["message_ids"]),
            kind=kind,
        )
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    run_id = error.get("run_id")
    return Request(
        session_id,
        content,
        server,
        start,
        end,
        response.status_code,
        code=error.get("code"),
        run_id=UUID(run_id) if run_id else None,
        kind=kind,
        detail=error.get("message") or response.text[:200],
    )


async def run_load(
    client: Client,
    sessions: Sequence[UUID],
    config: LoadConfig,
    rng: random.Random,
    stop: asyncio.Event,
) -> int:
    """Send bursts until ``stop`` is set; return how many bursts were sent."""
    idle: asyncio.Queue[UUID] = asyncio.Queue()
    for session_id in rng.sample(list(sessions), len(sessions)):
        idle.put_nowait(session_id)
    bursts = itertools.count()

    async def worker() -> None:
        while not stop.is_set():
            session_id = idle.get_nowait()
            number = next(bursts)
            size = rng.randint(1, config.max_burst)
            await asyncio.gather(
                *(
                    client.send(
                        session_id,
                        client.content("load", session_id, f"burst {number} part {i}/{size}"),
                        rng.randrange(len(client.urls)),
                    )
                    for i in range(1, size + 1)
                )
            )
            idle.put_nowait(session_id)
            await asyncio.sleep(rng.uniform(0, config.max_pause_s))

    await asyncio.gather(*(worker() for _ in range(min(config.workers, len(sessions)))))
    return next(bursts)
