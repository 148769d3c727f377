"""The contract between the turn queue and what it drives: jobs, outcomes, answers.

``TurnQueue`` (``core.py``) hands a ``Job`` to a ``Runner`` and gets an ``Outcome`` back; each
caller of ``submit`` receives an ``Answer``. Nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from uuid import UUID

from threadline.errors import RunFailed

Strategy = Literal["merge", "enqueue", "reject"]
CancelReason = Literal["superseded", "shutdown"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``accept`` returns: the stored message and, on the fast path, the opened turn."""

    message_id: UUID
    seq: int
    prepared: Any = None


@dataclass(slots=True)
class Job:
    """One run of one session, shared between the queue and its runner."""

    session_id: UUID
    run_id: UUID
    upto_seq: int
    prepared: Any = None
    # The newest covered caller's request options (agent, context, ...), opaque to the queue.
    options: Any = None
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
    cancel_reason: CancelReason | None = None
    superseded_by: UUID | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished run as the runner reports it. ``result`` is opaque to the queue."""

    run_id: UUID
    message_ids: tuple[UUID, ...]
    result: Any = None
    error: RunFailed | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What one caller of ``submit`` gets back."""

    message_id: UUID
    outcome: Outcome
    superseded: bool


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
