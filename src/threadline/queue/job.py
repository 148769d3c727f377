"""The contract between the turn queue and what it drives: jobs, outcomes, answers.

``TurnQueue`` (``core.py``) hands a ``Job`` to a ``Runner`` and gets an ``Outcome`` back; each
caller of ``submit`` receives an ``Answer``. Nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from uuid import UUID

from threadline.errors import ThreadlineError
from threadline.store.base import Turn

# superseded: a newer message merges; shutdown: the server stops; cancelled: a client asked.
CancelReason = Literal["superseded", "shutdown", "cancelled"]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What a caller asked of the run answering its message. Stored with the message, so any
    process that takes the session over runs it the way its caller asked."""

    agent: str
    user_id: str | None = None
    history_limit: int = 20
    context: Mapping[str, Any] = field(default_factory=dict)
    # The caller streams: the run that answers this message streams the model's reply.
    stream: bool = False
    # Where to POST the reply (delivery/); None: the agent's default, if it has one.
    webhook_url: str | None = None
    # Added to the agent's own instructions for this run (OpenAI's ``instructions``). A run
    # that answers several messages takes the newest one's options (``Job.options``), so the
    # instructions of the newest message apply.
    instructions: str | None = None
    # The caller's trace context (W3C ``traceparent``) and when its message was accepted, when
    # tracing is on: the run answering the message joins that trace (``tracing.py``).
    trace: Mapping[str, str] | None = None
    # The process whose caller waits for this message's answer (the Redis coordinator's node
    # id, set where the message was stored): whichever process runs it publishes the answer
    # there alone (``coordination/mailbox.py``).
    reply_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        raw = {
            "agent": self.agent,
            "user_id": self.user_id,
            "history_limit": self.history_limit,
            "context": dict(self.context),
        }
        if self.stream:
            raw["stream"] = True
        if self.webhook_url is not None:
            raw["webhook_url"] = self.webhook_url
        if self.instructions is not None:
            raw["instructions"] = self.instructions
        if self.trace is not None:
            raw["trace"] = dict(self.trace)
        if self.reply_to is not None:
            raw["reply_to"] = self.reply_to
        return raw

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RunOptions:
        return cls(
            raw["agent"],
            raw.get("user_id"),
            raw["history_limit"],
            raw.get("context", {}),
            stream=bool(raw.get("stream", False)),
            webhook_url=raw.get("webhook_url"),
            instructions=raw.get("instructions"),
            trace=raw.get("trace"),
            reply_to=raw.get("reply_to"),
        )


@dataclass(frozen=True, slots=True)
class TurnResult:
    """A committed reply, as every caller of the run receives it."""

    message: str
    reply_message_id: UUID
    tool_calls: list[dict[str, Any]]
    tool_outputs: list[dict[str, Any]]
    usage: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``accept`` returns: the stored message and, on the fast path, the opened turn."""

    message_id: UUID
    seq: int
    prepared: Turn | None = None


@dataclass(slots=True)
class Job:
    """One run of one session, shared between the queue and its runner."""

    session_id: UUID
    run_id: UUID
    upto_seq: int
    # The fast path's turn, opened by the insert; None: the runner opens the run itself.
    prepared: Turn | None
    # The newest covered caller's request options (agent, context, ...).
    options: RunOptions | None
    # Set by the runner on its first step; a job cancelled before that never ran any code,
    # so the runner checks ``cancel_reason`` itself instead of relying on CancelledError.
    started: bool = False
    # Set by the runner right before its commit write: past this point a cancel could leave
    # the caller unsure whether the reply landed, so the queue no longer cancels.
    committing: bool = False
    # Set by the runner before it asks the store to open the run. A superseded job that never
    # got that far has no row, so the next run takes over its id: the run it superseded
    # then names, in ``superseded_by``, a run that exists.
    opening: bool = False
    # Set by the runner once the run is open in the store (its row names its messages): from
    # then on a client's cancel answers those messages, so only then may a client cancel it.
    opened: bool = False
    cancel_reason: CancelReason | None = None
    superseded_by: UUID | None = None
    # Set by the queue: the runner hands its outcome over early through it when it must go
    # on working after the callers are answered (recording a failure the store refused).
    # The queue then resolves the callers at once and starts no other run of the session
    # until the runner returns.
    settle: Callable[[Outcome], None] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished run as the runner reports it: a reply (``result``) or an ``error``.

    ``message_ids`` are the messages the run closed: answered by its reply, or answered by
    its failure (they are not prompted again). An error with no ``message_ids`` closed nothing
    (a store error, a handoff): the messages stay unanswered.
    """

    run_id: UUID
    message_ids: tuple[UUID, ...]
    result: TurnResult | None = None
    error: ThreadlineError | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What one caller of ``submit`` gets back."""

    message_id: UUID
    outcome: Outcome
    superseded: bool
    # The caller repeated an idempotency key: nothing was stored for it, and this is the
    # answer of the message the key names.
    replayed: bool = False


class Runner(Protocol):
    def __call__(self, job: Job, /) -> Awaitable[Outcome]: ...


class Timers(Protocol):
    """The clock and scheduler the queue uses; tests substitute a manual one."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.Handle: ...


class LoopTimers:
    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.Handle:
        return asyncio.get_running_loop().call_later(delay, callback)


Accept = Callable[[UUID | None], Awaitable[Accepted]]
