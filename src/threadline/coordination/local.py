"""In-process coordination: one ``TurnQueue`` serves every session of this process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from threadline import metrics
from threadline.agents import AgentRegistry
from threadline.config import Settings
from threadline.coordination import replay
from threadline.coordination.answers import stored_answer
from threadline.coordination.base import OnStored, TurnRequest
from threadline.coordination.events import LocalEvents
from threadline.errors import AnswerPending, Handoff, ShuttingDown, StoreUnavailable
from threadline.events import EventSink
from threadline.queue.core import Accept, Accepted, Answer, TurnQueue
from threadline.queue.job import RunOptions
from threadline.queue.limit import AdaptiveLimit, ConcurrencyLimit
from threadline.runner import TurnRunner, until_the_store_answers
from threadline.store import DuplicateMessage, Message, NewMessage, RunStart, Store

if TYPE_CHECKING:
    from threadline.tracing import Tracing

log = logging.getLogger(__name__)

# Sessions with unanswered messages a process takes on when it starts.
STRANDED_BATCH = 1000


def build_queue(
    store: Store,
    registry: AgentRegistry,
    settings: Settings,
    events: EventSink | None = None,
    on_idle: Callable[[UUID], None] | None = None,
    on_delivery: Callable[[], None] | None = None,
    tracing: Tracing | None = None,
) -> TurnQueue:
    """The turn queue both coordinators run, configured from settings."""
    runner = TurnRunner(
        store,
        registry,
        model_timeout_s=settings.model_timeout_s,
        events=events,
        on_delivery=on_delivery,
        tracing=tracing,
    )
    return TurnQueue(
        runner,
        max_concurrent=concurrency_limit(settings),
        merge_window=settings.merge_window_ms / 1000,
        merge_max_wait=settings.merge_max_wait_ms / 1000,
        session_queue_max=settings.session_queue_max,
        on_idle=on_idle,
        on_slot_wait=metrics.SLOT_WAIT.observe,
    )


# Where MAX_CONCURRENT_RUNS=auto starts (the old fixed default).
ADAPTIVE_INITIAL_RUNS = 32


def concurrency_limit(settings: Settings) -> int | ConcurrencyLimit:
    """MAX_CONCURRENT_RUNS: a pinned count, or ``auto``: a limit that adapts from
    ``ADAPTIVE_INITIAL_RUNS``."""
    if settings.max_concurrent_runs != "auto":
        return settings.max_concurrent_runs
    return AdaptiveLimit(
        initial=ADAPTIVE_INITIAL_RUNS,
        minimum=settings.adaptive_runs_min,
        maximum=settings.adaptive_runs_max,
        lag_target_s=settings.adaptive_lag_target_ms / 1000,
    )


def traced(request: TurnRequest, tracing: Tracing | None) -> TurnRequest:
    """The request with its caller's trace context stamped into its run options, so the run
    that answers it joins the caller's trace wherever it runs (``tracing.py``)."""
    if tracing is None:
        return request
    return dataclasses.replace(request, trace=tracing.stamp())


def user_message(request: TurnRequest) -> NewMessage:
    keyed = request.idempotency_key is not None
    return NewMessage(
        id=uuid.uuid4(),
        role="user",
        content=request.content,
        channel_payload=request.channel_payload,
        # Stored with the message: whichever process runs it runs it the way it was asked.
        options=request.options.to_json(),
        idempotency_key=request.idempotency_key,
        fingerprint=request.fingerprint if keyed else None,
    )


def storing(
    store: Store,
    request: TurnRequest,
    model_name: str,
    on_stored: OnStored | None = None,
) -> Accept:
    """The queue's ``accept`` for one request: insert the message, opening the run on the
    fast path, and tell ``on_stored`` the new message's id."""

    async def accept(run_id: UUID | None) -> Accepted:
        start = None
        if run_id is not None:
            start = RunStart(run_id, request.agent, model_name, request.history_limit)
        stored, turn = await store.add_user_message(
            request.session_id, user_message(request), start=start
        )
        if on_stored is not None:
            on_stored(stored.id)
        return Accepted(stored.id, stored.seq, turn)

    return accept


async def adopt_unanswered(
    store: Store, queue: TurnQueue, session_id: UUID, history_limit: int
) -> list[tuple[UUID, RunOptions, asyncio.Future[Answer]]]:
    """Put every unanswered message of a session into the queue, each run with the options
    stored with it; messages the queue holds already are not added twice."""
    session = await store.get_session(session_id)
    if session is None:
        return []
    fallback = RunOptions(session.agent, session.user_id, history_limit)
    adopted = []
    for message in await store.unanswered(session_id):
        options = RunOptions.from_json(message.options) if message.options else fallback
        future = queue.adopt(session_id, message.id, message.seq, "merge", options)
        adopted.append((message.id, options, future))
    return adopted


async def resolve_handoff(store: Store, answer: Answer) -> Answer:
    """A run that handed off (another run answered) means: the answer is in the store."""
    if not isinstance(answer.outcome.error, Handoff):
        return answer
    found = await stored_answer(store, answer.message_id)
    if found is None:
        raise AnswerPending(
            f"message {str(answer.message_id)!r} is stored and not answered yet; "
            "its answer will appear in the session's history"
        )
    return found


class LocalCoordinator:
    def __init__(
        self,
        store: Store,
        registry: AgentRegistry,
        settings: Settings,
        on_delivery: Callable[[], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._history_limit = settings.history_limit
        self._tracing = tracing
        self.events = LocalEvents()
        self.queue = build_queue(
            store, registry, settings, self.events, on_delivery=on_delivery, tracing=tracing
        )
        self._recovering: dict[UUID, asyncio.Task[None]] = {}
        self._repeats = 0  # callers of a repeated idempotency key waiting for its answer

    async def submit(self, request: TurnRequest, on_stored: OnStored | None = None) -> Answer:
        with metrics.CALLERS_WAITING.track_inprogress():
            return await self._submit(request, on_stored)

    async def _submit(self, request: TurnRequest, on_stored: OnStored | None) -> Answer:
        request = traced(request, self._tracing)
        loaded = await self._registry.get(request.agent)
        first = await replay.original(self._store, request)
        if first is not None:
            return await self._replay(request, first, on_stored)
        accept = storing(self._store, request, loaded.model_name, on_stored)
        try:
            answer = await self.queue.submit(
                request.session_id, request.strategy, accept, request.options
            )
        except DuplicateMessage as duplicate:  # a request with the same key stored first
            return await self._replay(request, duplicate.existing, on_stored)
        except StoreUnavailable:
            # The insert may have committed with its reply lost on the way back: a message
            # stored, whose caller heard 503, that no run would answer until the session's
            # next message. Look again once the store is back.
            self._recover(request.session_id)
            raise
        return await resolve_handoff(self._store, answer)

    async def recover_stranded(self) -> None:
        """At start-up: answer what a stopped process left unanswered.

        This coordinator serves its store alone, so every unanswered message at start-up was
        accepted by a process that stopped before answering it (a shutdown's cancelled run, a
        crash): without this, it would wait for its session's next message, and a background
        request's caller, told 202, would never hear of it.
        """
        sessions = await self._store.sessions_with_unanswered(STRANDED_BATCH)
        for session_id in sessions:
            self._recover(session_id)
        if sessions:
            log.info("answering unanswered messages of %d sessions", len(sessions))

    async def _replay(
        self, request: TurnRequest, first: Message, on_stored: OnStored | None
    ) -> Answer:
        """Answer a request repeating an idempotency key with the answer of ``first``."""
        replay.check_same_body(request, first)
        self._repeats += 1
        try:
            return replay.replayed(await self._answer_of(request, first, on_stored))
        finally:
            self._repeats -= 1

    async def _answer_of(
        self, request: TurnRequest, first: Message, on_stored: OnStored | None
    ) -> Answer:
        found: Answer | None = None
        future = await self.queue.follow(first.session_id, first.id)
        if future is None:
            found = await stored_answer(self._store, first.id)
            if found is None:
                # Stored, unanswered, and no caller of it here: its own caller heard 503 (its
                # recovery is pending) or its process stopped first. Answer it now.
                options = replay.options_of(request, first)
                future = self.queue.adopt(first.session_id, first.id, first.seq, "enqueue", options)
                # Its answer lands in the history even if this caller goes away meanwhile.
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Told only now that the message is on its way to an answer: a caller that stops
        # waiting once told (a background request) leaves nothing half done.
        if on_stored is not None:
            on_stored(first.id)
        if found is not None:
            return found
        assert future is not None
        return await resolve_handoff(self._store, await asyncio.shield(future))

    def _recover(self, session_id: UUID) -> None:
        if session_id in self._recovering:
            return
        task = asyncio.ensure_future(self._recovery(session_id))
        self._recovering[session_id] = task
        task.add_done_callback(lambda _: self._recovering.pop(session_id, None))

    async def _recovery(self, session_id: UUID) -> None:
        try:
            async for attempt in until_the_store_answers():
                with attempt:
                    adopted = await adopt_unanswered(
                        self._store, self.queue, session_id, self._history_limit
                    )
        except ShuttingDown:
            return  # the next process answers what is left
        for _, _, future in adopted:
            # Nobody awaits these answers; the run stores them in the session's history.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if adopted:
            log.info("session %s: answering %d stored messages", session_id, len(adopted))

    async def cancel(self, session_id: UUID, run_id: UUID | None = None) -> bool:
        return self.queue.cancel(session_id, run_id) is not None

    async def ping(self) -> None:
        """Nothing outside this process to check."""

    def metrics(self) -> dict[str, Any]:
        return {
            "sessions_in_memory": self.queue.session_count,
            "queued_messages": self.queue.depth,
            "runs_in_flight": self.queue.running,
            "waiting_for_slot": self.queue.waiting_for_slot,
            "watchers": len(self.events),
            "event_logs": self.events.logs,
            "repeats_waiting": self._repeats,
        }

    async def drain(self, grace: float) -> None:
        for task in list(self._recovering.values()):
            task.cancel()
        await asyncio.gather(*self._recovering.values(), return_exceptions=True)
        await self.queue.aclose(grace)

    async def aclose(self, grace: float = 0.0) -> None:
        await self.drain(grace)
