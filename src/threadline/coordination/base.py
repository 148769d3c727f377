"""The coordinator interface: how the API hands a message to whichever queue serves it.

``LocalCoordinator`` (this process only) and ``RedisCoordinator`` (several processes or hosts)
implement it. Both store the message before anything else can happen to it and both resolve
every caller with the ``Answer`` of the run that answered its message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from threadline.config import Strategy
from threadline.coordination.events import EventBus
from threadline.queue.core import TurnQueue
from threadline.queue.job import Answer, RunOptions


@dataclass(frozen=True, slots=True)
class TurnRequest:
    session_id: UUID
    agent: str
    content: str
    strategy: Strategy
    user_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    history_limit: int = 20
    channel_payload: dict[str, Any] | None = None
    stream: bool = False
    webhook_url: str | None = None
    # Names the message within its session: a request repeating it stores nothing and gets
    # the answer of the message stored first (``coordination/replay.py``).
    idempotency_key: str | None = None
    # Added to the agent's instructions by the run that answers this message, when this is the
    # newest message that run answers (``RunOptions``).
    instructions: str | None = None
    # Set by the coordinator when tracing is on (``RunOptions.trace``).
    trace: dict[str, str] | None = None
    # Set by the Redis coordinator: its node, where the caller waits (``RunOptions.reply_to``).
    reply_to: str | None = None

    @property
    def options(self) -> RunOptions:
        return RunOptions(
            self.agent,
            self.user_id,
            self.history_limit,
            self.context,
            stream=self.stream,
            webhook_url=self.webhook_url,
            instructions=self.instructions,
            trace=self.trace,
            reply_to=self.reply_to,
        )

    @property
    def fingerprint(self) -> str:
        """What makes two requests with one idempotency key the same message: what the
        message says and whose it is (agent, content, user, context, channel payload). How
        to answer it (strategy, history window) is left out: a retry may ask differently,
        and the message is answered once, the first request's way."""
        body = [self.agent, self.content, self.user_id, self.context, self.channel_payload]
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# Told the stored message's id as soon as the insert committed, before any run answers it
# (a background request's 202, a stream's ``message.accepted``).
OnStored = Callable[[UUID], None]


class Coordinator(Protocol):
    @property
    def events(self) -> EventBus:
        """Run events of every session, for streams and joiners (``events.py``)."""

    @property
    def queue(self) -> TurnQueue:
        """This process's turn queue: its concurrency limit is shown as a metric and fed the
        event loop's lag by the monitor (``app.py``)."""

    async def submit(self, request: TurnRequest, on_stored: OnStored | None = None) -> Answer:
        """Store the message and wait for the run that answers it.

        Raises ``SessionBusy``, ``QueueFull`` or ``Unavailable`` before storing anything.
        """

    async def drain(self, grace: float) -> None:
        """Stop taking messages, give runs in flight ``grace`` seconds, then fail every caller
        still waiting with ``ShuttingDown`` (503). The start of a shutdown, while responses
        can still go out (``shutdown.py``); ``aclose`` drains first, should nothing have."""

    async def cancel(self, session_id: UUID, run_id: UUID | None = None) -> bool:
        """Ask whichever process runs the session to cancel its run in flight (only if it is
        ``run_id``, when given). False if no process owns the session, or this one owns it and
        has no such run to cancel; True once the owner was asked (it may have finished)."""

    async def ping(self) -> None:
        """Raise ``CoordinatorUnavailable`` if coordination is down (for /ready)."""

    def metrics(self) -> dict[str, Any]:
        """Numbers for /debug/metrics."""

    async def aclose(self, grace: float = 0.0) -> None: ...
