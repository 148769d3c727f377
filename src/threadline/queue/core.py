"""The per-session turn queue: a pure asyncio state machine with no I/O.

Everything that touches a database or a model is injected: ``submit`` gets an *accept*
callable that stores the user message, and the queue is built with a *runner* that answers a
batch of stored messages. The queue decides only **when** a run starts, **which** messages it
answers and **when** it is cancelled, so its tests drive it with events alone.

Per-session state machine (one ``_Session`` per session with anything in flight; dropped when
it returns to IDLE, so memory follows live sessions, not sessions ever seen)::

             accept done                  window over, slot free
    IDLE ──────────────────▶ PENDING ─────────────────────────────▶ RUNNING
      ▲                       │  ▲  (debounce window / waiting        │   │
      │                       │  │   for a concurrency slot;          │   │ commit / fail
      │                       │  │   new messages simply join)        │   │
      │                       │  └──── merge message arrives: ◀───────┘   │
      │                       │        cancel the run, await its end      │
      └───────────────────────┴───────────── nothing left ◀───────────────┘

A run is *not* cancelled once its runner has entered the commit (``Job.committing``) or once the
oldest message it answers has waited ``merge_max_wait`` (liveness): the newcomer waits for the
next run instead. At most one runner task exists per session, and the next run starts only
after the previous task has finished, cleanup included, so one session never has two model
calls in flight.

Fast path: when a message reaches an idle session with no debounce window and a free slot, the
queue hands ``accept`` a run id so the store can insert the message *and* open the run in one
write; the run then starts with that prepared turn (once no other insert of the session is in
flight: a run never starts covering a message whose ``accept`` has not returned).

Concurrency: at most ``limit.value`` runs hold a slot (``queue/limit.py``); the rest wait in
FIFO order. The limit may move: every run that succeeds reports how long it held its slot, and
the loop-lag monitor reports lag through ``observe_lag``. When it grows, waiting sessions start;
when it shrinks, runs in flight finish and nothing starts until the running count is below it.

Following: a request repeating an idempotency key stores nothing; its caller ``follow``s the
stored message's answer. That is no arrival: it never changes what runs or when.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from threadline.config import Strategy
from threadline.errors import QueueFull, RunCancelled, RunFailed, SessionBusy, ShuttingDown
from threadline.queue.job import (
    Accept,
    Accepted,
    Answer,
    CancelReason,
    Job,
    LoopTimers,
    Outcome,
    Runner,
    RunOptions,
    Timers,
)
from threadline.queue.limit import ConcurrencyLimit, FixedLimit

log = logging.getLogger(__name__)

# Re-exported: callers import the queue's vocabulary from here.
__all__ = [
    "Accept",
    "Accepted",
    "Answer",
    "CancelReason",
    "Job",
    "LoopTimers",
    "Outcome",
    "RunOptions",
    "Runner",
    "Strategy",
    "Timers",
    "TurnQueue",
]


@dataclass(eq=False, slots=True)
class _Waiter:
    message_id: UUID
    seq: int
    strategy: Strategy
    arrived_at: float
    future: asyncio.Future[Answer]
    options: RunOptions | None = None
    superseded: bool = False


@dataclass(eq=False, slots=True)
class _Session:
    id: UUID
    waiters: list[_Waiter] = field(default_factory=list)  # unanswered, in seq order
    reserved: int = 0  # admitted, their insert still in flight
    starting: bool = False  # fast path: the insert that opens a run is in flight
    prepared: Job | None = None  # fast path: the opened run, waiting for other inserts
    job: Job | None = None
    task: asyncio.Task[Outcome] | None = None
    queued: bool = False  # waiting for a concurrency slot
    queued_at: float = 0.0
    run_started: float = 0.0  # when the run in flight took its slot
    timer: asyncio.Handle | None = None
    timer_due: float = 0.0
    last_arrival: float = 0.0
    next_run_id: UUID | None = None
    # ``follow`` callers waiting for the session's inserts in flight to come back.
    landing: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        return not (self.waiters or self.reserved or self.starting or self.task or self.queued)


class TurnQueue:
    """Per-session FIFO turn queue with cancel-and-merge. See the module docstring."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_concurrent: int | ConcurrencyLimit = 256,
        merge_window: float = 0.0,
        merge_max_wait: float = 10.0,
        session_queue_max: int = 100,
        timers: Timers | None = None,
        on_idle: Callable[[UUID], None] | None = None,
        on_slot_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._runner = runner
        self._on_idle = on_idle
        # Told how long a session waited for a concurrency slot (a metric), when it had to.
        self._on_slot_wait = on_slot_wait
        # An int pins the limit; a ConcurrencyLimit may move it with the samples fed to it.
        self._limit = (
            FixedLimit(max_concurrent) if isinstance(max_concurrent, int) else max_concurrent
        )
        self._merge_window = merge_window
        self._merge_max_wait = merge_max_wait
        self._queue_max = session_queue_max
        self._timers = timers or LoopTimers()
        self._sessions: dict[UUID, _Session] = {}
        self._slot_waiters: deque[_Session] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # -- public API ---------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        """Sessions with state in memory; zero once everything is answered."""
        return len(self._sessions)

    @property
    def running(self) -> int:
        return self._running

    @property
    def limit(self) -> int:
        """Runs that may hold a concurrency slot now."""
        return self._limit.value

    @property
    def depth(self) -> int:
        """Unanswered messages held here: stored (or being stored), run or waiting to be."""
        return sum(len(s.waiters) + s.reserved for s in self._sessions.values())

    @property
    def waiting_for_slot(self) -> int:
        """Sessions ready to run that wait for a concurrency slot."""
        return len(self._slot_waiters)

    def has(self, session_id: UUID) -> bool:
        """Whether the session has anything in flight here."""
        return session_id in self._sessions

    def busy_run(self, session_id: UUID) -> UUID | None:
        state = self._sessions.get(session_id)
        return state.job.run_id if state and state.job else None

    async def submit(
        self,
        session_id: UUID,
        strategy: Strategy,
        accept: Accept,
        options: RunOptions | None = None,
    ) -> Answer:
        """Admit, store (through ``accept``) and answer one message.

        Raises ``SessionBusy``/``QueueFull``/``ShuttingDown`` before anything is stored. Once
        ``accept`` has been called the work belongs to the queue: cancelling the caller (a
        client that disconnects) does not cancel the insert or the run.
        """
        state = self._admit(session_id, strategy)
        fast_run_id = self._claim_fast_path(state)
        task = self._spawn(self._accept_and_wait(state, strategy, accept, fast_run_id, options))
        return await asyncio.shield(task)

    async def follow(self, session_id: UUID, message_id: UUID) -> asyncio.Future[Answer] | None:
        """The answer of a message this queue holds, for one more caller of it (a request
        repeating its idempotency key); None if the queue does not hold the message.

        Following changes nothing about what runs or when: the message is not a new arrival,
        so it never supersedes a run, and it is answered by the run that answers it anyway.
        While inserts of the session are in flight the message may be one of them, stored but
        not yet back from the store: wait for them before saying None. Await the returned
        future through ``asyncio.shield``: it is the message's own caller's too.
        """
        while True:
            state = self._sessions.get(session_id)
            if state is None:
                return None
            for waiter in state.waiters:
                if waiter.message_id == message_id:
                    return waiter.future
            if not state.reserved:
                return None
            landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            state.landing.append(landed)
            await landed

    def adopt(
        self,
        session_id: UUID,
        message_id: UUID,
        seq: int,
        strategy: Strategy = "merge",
        options: RunOptions | None = None,
    ) -> asyncio.Future[Answer]:
        """Take on a message that is already stored (by another process, or found unanswered).

        It joins the session like a local arrival (and may supersede the run in flight), but
        nobody here awaits the returned future: the coordinator forwards its answer.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down; not accepting messages")
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = _Session(session_id)
        for known in state.waiters:
            if known.message_id == message_id:
                return known.future
        waiter = _Waiter(
            message_id,
            seq,
            strategy,
            self._timers.now(),
            asyncio.get_running_loop().create_future(),
            options,
        )
        self._insert_waiter(state, waiter)
        self._on_arrival(state, waiter)
        return waiter.future

    def cancel(self, session_id: UUID, run_id: UUID | None = None) -> UUID | None:
        """A client's cancel: stop the session's run in flight (only if it is ``run_id``, when
        given) and return its id; None if there is no such run or it is past cancelling (in
        its commit, or already cancelled or superseded). Its callers get ``RunCancelled``;
        messages that arrived after it are answered by the next run."""
        state = self._sessions.get(session_id)
        job = state.job if state is not None else None
        if state is None or job is None or state.task is None or state.task.done():
            return None
        if run_id is not None and job.run_id != run_id:
            return None
        if not job.opened or job.committing or job.cancel_reason is not None:
            return None
        self._cancel(state, "cancelled")
        return job.run_id

    def observe_lag(self, seconds: float) -> None:
        """The event loop was ``seconds`` late (the loop-lag monitor): the limit may shrink."""
        self._limit.observe_lag(seconds, self._running)
        self._fill_slots()

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop intake, give runs in flight ``grace`` seconds, then cancel what is left."""
        self._closing = True
        for state in list(self._sessions.values()):
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
        self._slot_waiters.clear()
        for state in list(self._sessions.values()):
            state.queued = False
            if state.task is None and not state.starting:
                self._fail_waiters(state, state.waiters, ShuttingDown("server is shutting down"))
        pending = {s.task for s in self._sessions.values() if s.task is not None}
        if pending and grace > 0:
            await asyncio.wait(pending, timeout=grace)
        for state in list(self._sessions.values()):
            if state.job is not None and state.task is not None and not state.task.done():
                self._cancel(state, "shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- admission ----------------------------------------------------------------------

    def _admit(self, session_id: UUID, strategy: Strategy) -> _Session:
        if self._closing:
            raise ShuttingDown("server is shutting down; not accepting messages")
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = _Session(session_id)
        if strategy == "reject" and not state.idle:
            raise SessionBusy(session_id, state.job.run_id if state.job else None)
        if len(state.waiters) + state.reserved >= self._queue_max:
            raise QueueFull(session_id, self._queue_max)
        state.reserved += 1
        return state

    def _claim_fast_path(self, state: _Session) -> UUID | None:
        quiet = not (state.waiters or state.starting or state.task or state.queued)
        if (
            quiet
            and state.reserved == 1
            and self._merge_window == 0
            and self._running < self._limit.value
        ):
            state.starting = True
            self._running += 1
            return uuid.uuid4()
        return None

    async def _accept_and_wait(
        self,
        state: _Session,
        strategy: Strategy,
        accept: Accept,
        fast_run_id: UUID | None,
        options: RunOptions | None,
    ) -> Answer:
        try:
            accepted = await accept(fast_run_id)
        except BaseException:
            state.reserved -= 1
            self._landed(state)
            if fast_run_id is not None:
                state.starting = False
                self._release_slot()
            # Messages stored meanwhile may have waited for this insert (``_start_prepared``,
            # ``_schedule``); give them their run. Settles the session if nothing is left.
            self._start_prepared(state)
            self._schedule(state)
            raise
        state.reserved -= 1
        waiter = _Waiter(
            accepted.message_id,
            accepted.seq,
            strategy,
            self._timers.now(),
            asyncio.get_running_loop().create_future(),
            options,
        )
        self._insert_waiter(state, waiter)
        if fast_run_id is not None:
            state.prepared = Job(state.id, fast_run_id, accepted.seq, accepted.prepared, options)
        else:
            self._on_arrival(state, waiter)
        self._start_prepared(state)
        self._landed(state)
        return await waiter.future

    @staticmethod
    def _landed(state: _Session) -> None:
        """An insert came back (stored or not): ``follow`` callers look again."""
        landing, state.landing = state.landing, []
        for landed in landing:
            if not landed.done():
                landed.set_result(None)

    def _start_prepared(self, state: _Session) -> None:
        # An insert that overtook the fast one may hold a seq the opened run covers: starting
        # before it came back would answer a message whose caller is not waiting yet, and
        # that caller would then get a run with nothing left to answer.
        if state.prepared is not None and not state.reserved:
            job, state.prepared = state.prepared, None
            state.starting = False
            self._start(state, job)

    @staticmethod
    def _insert_waiter(state: _Session, waiter: _Waiter) -> None:
        # Inserts usually finish in seq order, but two round-trips can overtake each other.
        waiters = state.waiters
        index = len(waiters)
        while index and waiters[index - 1].seq > waiter.seq:
            index -= 1
        waiters.insert(index, waiter)

    def _on_arrival(self, state: _Session, waiter: _Waiter) -> None:
        state.last_arrival = waiter.arrived_at
        job = state.job
        if job is not None and waiter.seq > job.upto_seq:
            if waiter.strategy == "merge" and self._may_supersede(state, job):
                self._cancel(state, "superseded")
            return  # the next run starts when this one's task has finished
        if state.starting or state.queued:
            return  # the run about to start (or the queued one) picks the message up
        self._schedule(state)

    def _may_supersede(self, state: _Session, job: Job) -> bool:
        if job.committing or job.cancel_reason is not None:
            return False
        if state.task is not None and state.task.done():
            return False  # the runner has returned; only its done callback is pending
        covered = [w for w in state.waiters if w.seq <= job.upto_seq]
        if not covered:
            return True
        return self._timers.now() - covered[0].arrived_at < self._merge_max_wait

    # -- starting runs ------------------------------------------------------------------

    def _schedule(self, state: _Session) -> None:
        """Start the session's next run now, after the debounce window, or when a slot frees."""
        if state.task is not None or state.starting or state.queued:
            return
        if self._closing:
            self._fail_waiters(state, state.waiters, ShuttingDown("server is shutting down"))
            return
        if not state.waiters:
            self._settle(state)
            return
        if state.reserved:
            # An insert in flight may already hold a seq below the next run's upto_seq (see
            # ``_start_prepared``). Its arrival, or its failure, schedules again.
            return
        if self._merge_window > 0:
            oldest = state.waiters[0].arrived_at
            due = min(state.last_arrival + self._merge_window, oldest + self._merge_max_wait)
            delay = due - self._timers.now()
            if delay > 0:
                if state.timer is None or state.timer_due != due:
                    if state.timer is not None:
                        state.timer.cancel()
                    state.timer_due = due
                    state.timer = self._timers.call_later(delay, lambda: self._on_timer(state))
                return
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if self._running >= self._limit.value:
            state.queued = True
            state.queued_at = self._timers.now()
            self._slot_waiters.append(state)
            return
        self._running += 1
        upto = self._next_upto(state)
        options = next(w.options for w in reversed(state.waiters) if w.seq <= upto)
        self._start(state, Job(state.id, self._next_run_id(state), upto, None, options))

    def _on_timer(self, state: _Session) -> None:
        state.timer = None
        self._schedule(state)

    def _next_run_id(self, state: _Session) -> UUID:
        run_id, state.next_run_id = state.next_run_id or uuid.uuid4(), None
        return run_id

    @staticmethod
    def _next_upto(state: _Session) -> int:
        # A merge message pulls every unanswered message before it into one run; an enqueue
        # message that is oldest gets a run of its own.
        merges = [w.seq for w in state.waiters if w.strategy == "merge"]
        return max(merges) if merges else state.waiters[0].seq

    def _start(self, state: _Session, job: Job) -> None:
        """Run ``job``; the caller has already taken a concurrency slot for it."""
        state.job = job
        state.run_started = self._timers.now()
        job.settle = lambda outcome: self._settle_early(state, job, outcome)
        if self._closing:
            job.cancel_reason = "shutdown"  # the runner bails out before calling the model
        task = self._spawn(self._runner(job))
        state.task = task
        task.add_done_callback(lambda t: self._on_run_done(state, job, t))
        if any(w.seq > job.upto_seq and w.strategy == "merge" for w in state.waiters):
            # Messages stored while the fast path's insert was in flight.
            self._cancel(state, "superseded")

    def _cancel(self, state: _Session, reason: CancelReason) -> None:
        job, task = state.job, state.task
        assert job is not None
        assert task is not None
        job.cancel_reason = reason
        if reason == "superseded":
            state.next_run_id = job.superseded_by = uuid.uuid4()
            for waiter in state.waiters:
                if waiter.seq <= job.upto_seq:
                    waiter.superseded = True
        if job.started:
            task.cancel()

    # -- finishing runs -----------------------------------------------------------------

    def _settle_early(self, state: _Session, job: Job, outcome: Outcome) -> None:
        # The runner goes on (it cannot be superseded any more: it is past its model call);
        # its callers need not wait for it. Nothing else of the session starts meanwhile.
        job.committing = True
        self._resolve(state, self._covered(state, job, outcome), outcome)

    def _on_run_done(self, state: _Session, job: Job, task: asyncio.Task[Outcome]) -> None:
        state.job = None
        state.task = None
        # ``settle`` closes over the job itself: a reference cycle that only the garbage
        # collector would free, with all the run's state hanging off it. Freed by reference
        # counting instead, a turn's objects never pile up for one long collection that
        # stalls the loop (docs/performance.md, "Reference cycles").
        job.settle = None
        if not task.cancelled() and task.exception() is None and task.result().error is None:
            # Only a run that answered tells how long a run takes: a cancelled one was cut
            # short, and a failed one (a timeout, a provider error) says nothing of our load.
            held = self._timers.now() - state.run_started
            self._limit.observe_latency(held, self._running)
        self._release_slot()
        if task.cancelled():
            # Superseded: the callers wait for the run that replaces this one. Cancelled by a
            # client: the run answered its messages by the cancel. Any other cancel means we
            # are going down, and the callers are owed a defined error.
            if job.cancel_reason == "cancelled":
                covered = [w for w in state.waiters if w.seq <= job.upto_seq]
                cancelled = RunCancelled("the run was cancelled", job.run_id)
                closed = tuple(w.message_id for w in covered)
                self._resolve(state, covered, Outcome(job.run_id, closed, error=cancelled))
            elif job.cancel_reason != "superseded":
                covered = [w for w in state.waiters if w.seq <= job.upto_seq]
                self._fail_waiters(state, covered, ShuttingDown("server shut down mid-run"))
            elif not job.opening and job.prepared is None:
                state.next_run_id = job.run_id
        elif (exc := task.exception()) is not None:
            # The runner reports every failure it knows as an outcome; this is a bug. The
            # callers get a defined error whose message reveals nothing of it.
            log.error("run %s of session %s raised", job.run_id, state.id, exc_info=exc)
            error = RunFailed("the run failed unexpectedly", job.run_id)
            outcome = Outcome(job.run_id, (), error=error)
            self._resolve(state, [w for w in state.waiters if w.seq <= job.upto_seq], outcome)
        else:
            outcome = task.result()
            self._resolve(state, self._covered(state, job, outcome), outcome)
        self._schedule(state)

    @staticmethod
    def _covered(state: _Session, job: Job, outcome: Outcome) -> list[_Waiter]:
        answered = set(outcome.message_ids)
        if outcome.error is not None:
            # Callers of a run that failed are owed its error, whatever it closed.
            return [w for w in state.waiters if w.seq <= job.upto_seq or w.message_id in answered]
        return [w for w in state.waiters if w.message_id in answered]

    def _resolve(self, state: _Session, waiters: list[_Waiter], outcome: Outcome) -> None:
        for waiter in waiters:
            state.waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_result(Answer(waiter.message_id, outcome, waiter.superseded))

    def _fail_waiters(self, state: _Session, waiters: list[_Waiter], exc: Exception) -> None:
        for waiter in list(waiters):
            state.waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        self._settle(state)

    def _release_slot(self) -> None:
        self._running -= 1
        self._fill_slots()

    def _fill_slots(self) -> None:
        while self._slot_waiters and self._running < self._limit.value:
            state = self._slot_waiters.popleft()
            state.queued = False
            if self._on_slot_wait is not None:
                self._on_slot_wait(self._timers.now() - state.queued_at)
            self._schedule(state)

    def _settle(self, state: _Session) -> None:
        if state.idle and state.timer is None and self._sessions.get(state.id) is state:
            del self._sessions[state.id]
            if self._on_idle is not None:
                self._on_idle(state.id)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A caller that went away never reads its task's error; retrieving it here keeps
        # asyncio from logging "exception was never retrieved" for errors already reported.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task
