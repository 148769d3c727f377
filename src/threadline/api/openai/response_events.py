"""A streamed response (``stream: true``) as OpenAI's semantic events.

    response.created            status queued: the message is stored
    response.in_progress        a run answering it started
    response.output_item.added  the run's assistant message (``msg_<run hex>``), then
    response.content_part.added its output_text part
    response.output_text.delta  the model's text as it streams
    response.output_text.done   \
    response.content_part.done   } the message's text is final
    response.output_item.done   /
    response.completed          the Response, ``output`` holding the reply alone

A run superseded mid-stream (a newer message of the session merged into a new run) cannot
take its text back: its output item ends at once with status ``incomplete``
(``output_text.done``, ``content_part.done``, ``output_item.done``), and the run that answers
the merged messages opens the next output item, at the next ``output_index``. The final
Response lists only the item that answered, so ``output_text`` is the reply; a client that
renders deltas drops an item that ends ``incomplete``.

A failed run (or an error after the message was stored) ends the stream with
``response.failed``: the Response with status ``failed`` and its ``error``, or status
``cancelled`` when a client cancelled the run. Every event carries ``sequence_number``.
The agent's tool calls run on the server and are not told here (the native stream has them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from sse_starlette import ServerSentEvent

from threadline.api.errors import error_body
from threadline.api.openai.response_object import (
    Ending,
    ItemStatus,
    Origin,
    item_id,
    output_message,
    output_text,
    response_object,
)
from threadline.api.streams import TurnStream
from threadline.events import RunEvent
from threadline.queue.job import Answer


@dataclasses.dataclass(slots=True)
class _Item:
    """The output item of one run, open while the run streams into it."""

    run_id: UUID
    index: int
    text: list[str] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> str:
        return item_id(self.run_id)


class _Events:
    """Numbers the events and keeps the open output item."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._sequence = itertools.count()
        self._indexes = itertools.count()
        self.item: _Item | None = None
        self.started = False

    def of(self, item: RunEvent | Answer | Exception) -> list[ServerSentEvent]:
        """The events that tell what ``TurnStream.follow`` yielded."""
        origin = self.origin
        if isinstance(item, RunEvent):
            events = []
            if item.kind == "run.started" and not self.started:
                self.started = True
                now = response_object(origin, "in_progress", run_id=item.run_id)
                events.append(self.event("response.in_progress", response=now))
            if item.kind in ("run.started", "text.delta"):
                events.extend(self.open(item.run_id))
            if item.kind == "text.delta":
                events.append(self.delta(item.data["delta"]))
            elif item.kind == "run.superseded":
                events.extend(self.close("incomplete"))
            return events
        if isinstance(item, Answer):
            ending = Ending.of_answer(item, time.time())
            if ending.status == "completed":
                events = [*self.open(ending.run_id), *self.close("completed", ending.text)]
                body = response_object(origin, "completed", ending=ending)
                return [*events, self.event("response.completed", response=body)]
            body = response_object(origin, ending.status, ending=ending)
        else:
            body = response_object(origin, "failed", error=error_body(item))
        return [*self.close("incomplete"), self.event("response.failed", response=body)]

    def event(self, kind: str, **data: Any) -> ServerSentEvent:
        body = {"type": kind, "sequence_number": next(self._sequence), **data}
        return ServerSentEvent(data=json.dumps(body), event=kind)

    def _part(self, kind: str, item: _Item, **data: Any) -> ServerSentEvent:
        return self.event(kind, item_id=item.id, output_index=item.index, content_index=0, **data)

    def open(self, run_id: UUID) -> list[ServerSentEvent]:
        """The item of ``run_id``, opened (after closing another run's) if it is not."""
        if self.item is not None and self.item.run_id == run_id:
            return []
        events = self.close("incomplete")
        item = self.item = _Item(run_id, next(self._indexes))
        added = output_message(run_id, None, "in_progress")
        events.append(self.event("response.output_item.added", output_index=item.index, item=added))
        events.append(self._part("response.content_part.added", item, part=output_text("")))
        return events

    def delta(self, text: str) -> ServerSentEvent:
        assert self.item is not None
        self.item.text.append(text)
        return self._part("response.output_text.delta", self.item, delta=text, logprobs=[])

    def close(self, status: ItemStatus, text: str | None = None) -> list[ServerSentEvent]:
        """End the open item (if any); ``text``: the final text, else what streamed."""
        item, self.item = self.item, None
        if item is None:
            return []
        final = "".join(item.text) if text is None else text
        done = output_message(item.run_id, final, status)
        return [
            self._part("response.output_text.done", item, text=final, logprobs=[]),
            self._part("response.content_part.done", item, part=output_text(final)),
            self.event("response.output_item.done", output_index=item.index, item=done),
        ]


async def semantic_events(stream: TurnStream, origin: Origin) -> AsyncIterator[ServerSentEvent]:
    """The body of a streamed ``POST /v1/responses`` (see the module docstring)."""
    events = _Events(origin)
    yield events.event("response.created", response=response_object(origin, "queued"))
    async with contextlib.aclosing(stream.follow()) as items:
        async for item in items:
            for event in events.of(item):
                yield event
            if not isinstance(item, RunEvent):
                return  # the answer, or what failed it, is the last thing ``follow`` yields
