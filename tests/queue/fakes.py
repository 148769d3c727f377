"""Stand-ins for everything ``TurnQueue`` gets injected: a store behind ``accept``, a runner
whose every step the test releases, and a clock that moves only when the test says so.

They record what happened on one shared ``Ledger`` so tests can compare the order of events
("the run that answered this message started after its insert returned") without timing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

from threadline.errors import ModelError, RunFailed
from threadline.queue.core import Accept, Accepted, Job, Outcome


class Signal:
    """Wakes every ``wait_for`` caller to re-check its predicate after each ``notify``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


class Ledger:
    """A logical clock: every recorded event gets the next step number."""

    def __init__(self) -> None:
        self._step = 0

    def step(self) -> int:
        self._step += 1
        return self._step


@dataclass(eq=False)
class StoredMessage:
    id: UUID
    session_id: UUID
    seq: int
    stored_at: int
    returned_at: int | None = None  # when ``accept`` handed it back to the queue
    answered_by: UUID | None = None


@dataclass(eq=False)
class AcceptCall:
    session_id: UUID
    run_id: UUID | None
    tag: object = None  # whatever the test passed to ``accept``, to find its caller again
    message: StoredMessage | None = None


class FakeStore:
    """Assigns seqs per session at insert time and answers prefixes, like ``store/base.py``."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger or Ledger()
        self.calls: list[AcceptCall] = []
        self.messages: list[StoredMessage] = []
        self.changed = Signal()
        self._by_session: dict[UUID, list[StoredMessage]] = {}
        self._gates: list[asyncio.Event] = []
        # Broken promises seen from the store's side; raising instead would only turn into a
        # failed run inside the queue.
        self.violations: list[str] = []
        self._last_seq: dict[UUID, int] = {}
        self._answered_seq: dict[UUID, int] = {}

    def accept(
        self,
        session_id: UUID,
        *,
        insert: asyncio.Event | None = None,
        reply: asyncio.Event | None = None,
        error: Exception | None = None,
        tag: object = None,
    ) -> Accept:
        """An ``accept`` for one message. It waits for ``insert`` before the message gets its
        seq, then for ``reply`` before returning (a slow round-trip back from the database)."""
        self._gates += [gate for gate in (insert, reply) if gate is not None]

        async def accept(run_id: UUID | None) -> Accepted:
            call = AcceptCall(session_id, run_id, tag)
            self.calls.append(call)
            self.changed.notify()
            if insert is not None:
                await insert.wait()
            if error is not None:
                raise error
            seq = self._last_seq[session_id] = self._last_seq.get(session_id, 0) + 1
            message = StoredMessage(uuid.uuid4(), session_id, seq, self.ledger.step())
            call.message = message
            self.messages.append(message)
            self._by_session.setdefault(session_id, []).append(message)
            self.changed.notify()
            if reply is not None:
                await reply.wait()
            message.returned_at = self.ledger.step()
            self.changed.notify()
            return Accepted(message.id, seq, prepared=("prepared", run_id))

        return accept

    def release_all(self) -> None:
        """Let every held insert finish, so a test that failed half-way can still close."""
        for gate in self._gates:
            gate.set()

    def open_run(self, job: Job) -> list[StoredMessage]:
        """The unanswered messages a run with ``job.upto_seq`` answers (``Turn.prompt``)."""
        answered = self._answered_seq.get(job.session_id, 0)
        return [m for m in self.stored(job.session_id) if answered < m.seq <= job.upto_seq]

    def commit_run(self, job: Job, prompt: list[StoredMessage]) -> None:
        for message in prompt:
            if message.answered_by is not None:
                self.violations.append(f"seq {message.seq} answered twice")
            message.answered_by = job.run_id
        answered = self._answered_seq.get(job.session_id, 0)
        self._answered_seq[job.session_id] = max(answered, job.upto_seq)
        self.changed.notify()

    def stored(self, session_id: UUID) -> list[StoredMessage]:
        return list(self._by_session.get(session_id, ()))


RunState = Literal["running", "committing", "cancelled", "succeeded", "failed", "raised"]


@dataclass(eq=False)
class RunRecord:
    """One call of the runner. The test ends its model call with ``reply``/``fail``."""

    job: Job
    started_at: int
    model: asyncio.Event = field(default_factory=asyncio.Event)
    commit: asyncio.Event = field(default_factory=asyncio.Event)
    action: Literal["reply", "error", "raise"] = "reply"
    state: RunState = "running"
    model_called: bool = False  # False when cancelled before it got past its first step
    # With ``FakeRunner(hold_open=True)`` the runner waits here, started but before asking
    # the store to open its run (as the real runner does while it loads the agent).
    may_open: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: int | None = None
    outcome: Outcome | None = None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def reply(self) -> None:
        """The model answers and the commit goes through."""
        self.model.set()
        self.commit.set()

    def begin_commit(self) -> None:
        """The model answers; the runner sets ``committing`` and waits for ``reply``."""
        self.model.set()

    def fail(self, how: Literal["error", "raise"] = "error") -> None:
        """The model fails: an ``Outcome`` with ``ModelError``, or an unexpected exception."""
        self.action = how
        self.model.set()


class FakeRunner:
    """A runner honouring the ``Job`` contract, blocked on events the test sets.

    ``auto=True`` answers every job at once (for volume tests).
    """

    def __init__(self, store: FakeStore, *, auto: bool = False, hold_open: bool = False) -> None:
        self.store = store
        self.auto = auto
        self.hold_open = hold_open
        self.runs: list[RunRecord] = []
        self.changed = Signal()
        self.in_flight: dict[UUID, int] = {}
        self.max_in_flight_per_session = 0
        self.total_in_flight = 0
        self.max_total_in_flight = 0

    async def __call__(self, job: Job) -> Outcome:
        job.started = True
        record = RunRecord(job, self.store.ledger.step())
        self.runs.append(record)
        if self.auto:
            record.reply()
        session = job.session_id
        self.in_flight[session] = self.in_flight.get(session, 0) + 1
        self.max_in_flight_per_session = max(
            self.max_in_flight_per_session, self.in_flight[session]
        )
        self.total_in_flight += 1
        self.max_total_in_flight = max(self.max_total_in_flight, self.total_in_flight)
        self.changed.notify()
        try:
            record.outcome = await self._run(record)
            return record.outcome
        except asyncio.CancelledError:
            record.state = "cancelled"
            raise
        except Exception:
            record.state = "raised"
            raise
        finally:
            self.in_flight[session] -= 1
            if not self.in_flight[session]:
                del self.in_flight[session]
            self.total_in_flight -= 1
            record.ended_at = self.store.ledger.step()
            self.changed.notify()

    async def _run(self, record: RunRecord) -> Outcome:
        job = record.job
        if job.cancel_reason is not None:
            raise asyncio.CancelledError
        if self.hold_open:
            await record.may_open.wait()
        job.opening = True
        job.opened = True
        record.model_called = True
        await record.model.wait()
        if record.action == "raise":
            raise RuntimeError("runner bug")
        if record.action == "error":
            record.state = "failed"
            return Outcome(job.run_id, (), error=ModelError("model failed", job.run_id))
        prompt = self.store.open_run(job)
        if not prompt:
            record.state = "failed"
            error = RunFailed("these messages were already answered", job.run_id)
            return Outcome(job.run_id, (), error=error)
        job.committing = True
        record.state = "committing"
        self.changed.notify()
        await record.commit.wait()
        self.store.commit_run(job, prompt)
        record.state = "succeeded"
        return Outcome(job.run_id, tuple(m.id for m in prompt), result=f"reply {job.run_id}")

    def live(self, session_id: UUID) -> RunRecord | None:
        """The session's run whose runner has not returned yet."""
        return next((r for r in self.runs if r.job.session_id == session_id and not r.ended), None)

    async def started(self, count: int) -> RunRecord:
        """Wait until ``count`` runs have started; return the last of them."""
        await self.changed.wait_for(lambda: len(self.runs) >= count)
        return self.runs[count - 1]

    async def ended(self, record: RunRecord) -> None:
        await self.changed.wait_for(lambda: record.ended)


class ManualTimers:
    """``Timers`` on a clock that only ``advance`` moves; due callbacks fire in order."""

    def __init__(self) -> None:
        self.time = 0.0
        self._pending: list[tuple[float, int, asyncio.Handle, Callable[[], None]]] = []
        self._order = 0

    def now(self) -> float:
        return self.time

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.Handle:
        handle = asyncio.Handle(callback, (), asyncio.get_running_loop())
        self._order += 1
        self._pending.append((self.time + delay, self._order, handle, callback))
        return handle

    @property
    def armed(self) -> int:
        return sum(1 for *_, handle, _ in self._pending if not handle.cancelled())

    def advance(self, seconds: float) -> None:
        target = self.time + seconds
        while True:
            due = [p for p in self._pending if p[0] <= target and not p[2].cancelled()]
            if not due:
                break
            first = min(due, key=lambda p: (p[0], p[1]))
            self._pending.remove(first)
            self.time = max(self.time, first[0])
            first[3]()
        self._pending = [p for p in self._pending if not p[2].cancelled()]
        self.time = target


class SteeredLimit:
    """A concurrency limit the test moves: each lag sample applies ``next`` (if set), and
    every sample is recorded as (kind, seconds, in_flight)."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.next: int | None = None
        self.samples: list[tuple[str, float, int]] = []

    def observe_latency(self, seconds: float, in_flight: int) -> None:
        self.samples.append(("latency", seconds, in_flight))

    def observe_lag(self, seconds: float, in_flight: int) -> None:
        self.samples.append(("lag", seconds, in_flight))
        if self.next is not None:
            self.value, self.next = self.next, None
