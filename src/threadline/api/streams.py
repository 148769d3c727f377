"""Server-Sent Events: a message followed to its answer, and late joiners of a run or message.

A stream of one message (``POST /agent/{name}/run`` with ``stream``, or
``GET /messages/{id}/events``) follows every run that covers the message: ``run.started``
lists the messages a run answers; when a newer message merges, ``run.superseded`` tells the
client to drop that run's text, and the same stream goes on with the run that answers the
merged messages; it ends with the event that closes the message (``run.completed`` or
``run.failed``). A stream of one run (``GET /runs/{id}/events``) ends with that run.

The final event of a ``POST`` stream comes from the coordinator's answer, exactly as a blocking
caller gets it; live events come from the event bus (``coordination/events.py``), which is best
effort. Joiners have no answer to wait for: they take the final event from the bus, and read the
store when the bus stays quiet for ``RECHECK_S`` (a publication lost in a Redis outage), so
every stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from uuid import UUID

from sse_starlette import EventSourceResponse, ServerSentEvent

from threadline.api.errors import error_body
from threadline.api.schemas import RunResponse
from threadline.coordination import Coordinator, TurnRequest
from threadline.coordination.answers import stored_answer
from threadline.coordination.events import Watch
from threadline.errors import Unavailable
from threadline.events import RunEvent, event_key
from threadline.queue.job import Answer
from threadline.store import Run, Store

# A joiner that heard nothing for this long asks the store whether its run or message ended.
RECHECK_S = 5.0
# The id of the event a stream starts with; bus ids are all greater.
ACCEPTED_ID = "0"


def reply(answer: Answer, session_id: UUID) -> RunResponse:
    """The body of a successful answer: what a blocking caller gets."""
    outcome = answer.outcome
    result = outcome.result
    assert result is not None, "an outcome without an error carries a reply"
    return RunResponse(
        message=result.message,
        session_id=session_id,
        run_id=outcome.run_id,
        message_ids=list(outcome.message_ids),
        message_id=answer.message_id,
        superseded=answer.superseded,
        tool_calls=result.tool_calls,
        tool_outputs=result.tool_outputs,
        usage=result.usage,
    )


def _sse(kind: str, data: dict[str, Any], event_id: str) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, default=str), event=kind, id=event_id)


def _final(
    answer: Answer, session_id: UUID, event_id: str, *, of_run: bool = False
) -> ServerSentEvent:
    """The final event from an answer; ``of_run``: for a run's stream, which follows no
    single message (``message_id`` null, as in the bus's ``run.completed``)."""
    outcome = answer.outcome
    if outcome.error is not None:
        return _failed(outcome.run_id, outcome.message_ids, error_body(outcome.error), event_id)
    body = reply(answer, session_id)
    if of_run:
        body.message_id = None
    return _sse("run.completed", body.model_dump(mode="json"), event_id)


def _failed(
    run_id: UUID | None, message_ids: tuple[UUID, ...], error: dict[str, str], event_id: str
) -> ServerSentEvent:
    data = {"run_id": run_id, "message_ids": [str(m) for m in message_ids], "error": error}
    return _sse("run.failed", data, event_id)


def _public(event: RunEvent, message_id: UUID | None = None) -> ServerSentEvent:
    """A bus event as clients see it; ``run.completed`` in the blocking reply's shape (with
    the followed message's id, if the stream follows one)."""
    data = {"run_id": str(event.run_id), **event.data}
    if event.kind == "run.completed":
        data = RunResponse(
            message=event.data["message"],
            session_id=event.session_id,
            run_id=event.run_id,
            message_ids=event.data["message_ids"],
            message_id=message_id,
            tool_calls=event.data["tool_calls"],
            tool_outputs=event.data["tool_outputs"],
            usage=event.data["usage"],
        ).model_dump(mode="json")
    return _sse(event.kind, data, event.id)


@dataclasses.dataclass(slots=True)
class MessageFollower:
    """Which events of its session concern one message, and whether its answer came."""

    message_id: UUID
    current: UUID | None = None  # the run answering the message now
    done: bool = False

    def accept(self, event: RunEvent) -> bool:
        if event.covers(self.message_id):
            self.current = event.run_id
            return True
        if event.run_id != self.current:
            return False
        if event.kind == "run.superseded":
            self.current = None
            return True
        if event.kind in ("run.completed", "run.failed"):
            self.current = None
            # A run that ends without closing the message (a shutdown) hands it to the next.
            self.done = event.closes(self.message_id)
            return self.done
        return True


class TurnStream:
    """``POST /agent/{name}/run`` with ``stream``: owns the caller's watch and its submit.

    ``start`` returns once the message is stored, so that every error before that (busy,
    queue full, unavailable) is still an HTTP status; ``events`` is the response body.
    A client that goes away closes the stream, not the run (the queue owns the run).
    """

    def __init__(self, coordinator: Coordinator, request: TurnRequest) -> None:
        self._coordinator = coordinator
        self._request = request
        self._watching: contextlib.AbstractAsyncContextManager[Watch] | None = None
        self._watch: Watch | None = None
        self._submit: asyncio.Task[Answer] | None = None
        self.message_id: UUID | None = None

    async def start(self) -> None:
        self._watching = self._coordinator.events.watch(self._request.session_id)
        watch = self._watch = await self._watching.__aenter__()
        stored: asyncio.Future[UUID] = asyncio.get_running_loop().create_future()

        def on_stored(message_id: UUID) -> None:
            if not stored.done():
                stored.set_result(message_id)

        request = dataclasses.replace(self._request, stream=True)
        submit = self._submit = asyncio.ensure_future(self._coordinator.submit(request, on_stored))
        # Wakes ``events`` when the answer is in; until then it waits on the bus alone.
        submit.add_done_callback(lambda _: watch.interrupt())
        try:
            waits: set[asyncio.Future[Any]] = {stored, submit}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not stored.done():
                submit.result()  # raises what refused the message before it was stored
            self.message_id = stored.result()
        except BaseException:
            await self.aclose()
            raise

    def response(self, heartbeat_s: float) -> EventSourceResponse:
        return EventSourceResponse(
            self.events(), ping=heartbeat_s, headers={"X-Session-Id": str(self._request.session_id)}
        )

    async def follow(self) -> AsyncGenerator[RunEvent | Answer | Exception, None]:
        """The message's run events as they come, then its answer (or what failed it): the
        body of every kind of stream (native SSE here, OpenAI's chunks in ``api/openai``)."""
        assert self._watch is not None
        assert self._submit is not None
        assert self.message_id is not None
        watch, submit = self._watch, self._submit
        follower = MessageFollower(self.message_id)
        try:
            while not submit.done():
                event = await watch.next()
                if event is not None and follower.accept(event) and not follower.done:
                    yield event
            # The answer is in, but it may have overtaken the run's events: the runner emits
            # them before it answers, and a publishing task (in this process or another)
            # takes them to the bus. Take what the log has, then wait for the event that
            # closes the message, which comes after every other event of its run; give up
            # after RECHECK_S (the events were lost in a Redis outage).
            with contextlib.suppress(Unavailable):
                await watch.catch_up(watch.last_id or "0")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (RECHECK_S if _has_closing_event(submit) else 0.0)
            while not follower.done:
                remaining = max(0.0, deadline - loop.time())
                event = await watch.next(within=remaining)
                if event is not None:
                    if follower.accept(event) and not follower.done:
                        yield event
                elif remaining == 0:
                    break
            try:
                yield submit.result()
            except Exception as exc:
                yield exc
        finally:
            await self.aclose()

    @property
    def session_id(self) -> UUID:
        return self._request.session_id

    @property
    def last_id(self) -> str:
        """The id of the last bus event ``follow`` read (the final event's id)."""
        return (self._watch.last_id if self._watch is not None else "") or ACCEPTED_ID

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The native SSE body (README, Streaming)."""
        assert self.message_id is not None
        sid = self._request.session_id
        accepted = {"message_id": str(self.message_id), "session_id": str(sid)}
        yield _sse("message.accepted", accepted, ACCEPTED_ID)
        async with contextlib.aclosing(self.follow()) as items:
            async for item in items:
                if isinstance(item, RunEvent):
                    yield _public(item)
                elif isinstance(item, Answer):
                    yield _final(item, sid, self.last_id)
                else:
                    yield _failed(None, (), error_body(item), self.last_id)

    async def aclose(self) -> None:
        if self._submit is not None and not self._submit.done():
            self._submit.cancel()  # the caller's wait only: the run goes on
        watching, self._watching = self._watching, None
        if watching is not None:
            await watching.__aexit__(None, None, None)


def _has_closing_event(submit: asyncio.Task[Answer]) -> bool:
    """Whether the run that answered emitted an event closing its messages: every run that
    answers with messages does (completed, failed, or cancelled by a client)."""
    if submit.cancelled() or submit.exception() is not None:
        return False
    return bool(submit.result().outcome.message_ids)


async def message_events(
    coordinator: Coordinator,
    store: Store,
    session_id: UUID,
    message_id: UUID,
    last_event_id: str | None,
) -> AsyncIterator[ServerSentEvent]:
    """``GET /messages/{id}/events``: the message's stream, joined late or resumed."""
    resume = event_key(last_event_id) if last_event_id else (-1,)
    follower = MessageFollower(message_id)
    # The whole log, to learn which run answers the message now; only events after
    # ``Last-Event-ID`` are sent.
    async with coordinator.events.watch(session_id, after="0") as watch:
        if last_event_id is None:
            accepted = {"message_id": str(message_id), "session_id": str(session_id)}
            yield _sse("message.accepted", accepted, ACCEPTED_ID)
        while True:
            answer = await stored_answer(store, message_id)
            if answer is not None:
                # Answered already (a joiner after the end), or while the bus stayed quiet.
                yield _final(answer, session_id, watch.last_id or ACCEPTED_ID)
                return
            while (event := await watch.next(within=RECHECK_S)) is not None:
                if follower.accept(event) and event_key(event.id) > resume:
                    yield _public(event, message_id)
                if follower.done:
                    return


async def run_events(
    coordinator: Coordinator, store: Store, run: Run, last_event_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """``GET /runs/{id}/events``: one run's events until it ends."""
    resume = event_key(last_event_id) if last_event_id else (-1,)
    async with coordinator.events.watch(run.session_id, after="0") as watch:
        while True:
            now = await store.get_run(run.id)
            if now is not None and now.finished_at is not None:
                yield await _run_end(store, now, watch.last_id or ACCEPTED_ID)
                return
            while (event := await watch.next(within=RECHECK_S)) is not None:
                if event.run_id != run.id:
                    continue
                if event_key(event.id) > resume:
                    yield _public(event)
                if event.terminal:
                    return


async def _run_end(store: Store, run: Run, event_id: str) -> ServerSentEvent:
    """The final event of a run that ended, read from the store."""
    if run.status == "superseded":
        data = {"run_id": str(run.id), "superseded_by": str(run.superseded_by)}
        return _sse("run.superseded", data, event_id)
    if run.status == "succeeded" and run.message_ids:
        answer = await stored_answer(store, run.message_ids[0])
        if answer is not None and answer.outcome.run_id == run.id:
            answer = dataclasses.replace(answer, superseded=False)
            return _final(answer, run.session_id, event_id, of_run=True)
    closed = run.message_ids if run.status in ("failed", "cancelled") else ()
    if run.status == "cancelled" and run.error_code != "run_cancelled":
        closed = ()  # a shutdown: the messages went to the next run
    error = {"code": run.error_code or "run_failed", "message": run.error or "the run failed"}
    return _failed(run.id, closed, error, event_id)
