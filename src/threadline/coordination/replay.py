"""Requests that repeat an idempotency key: what both coordinators share about them.

Within a session, an idempotency key names one message: the first request that stored it. A
request repeating the key (a channel's webhook delivered twice, a client retrying after a
timeout) stores nothing and is no new arrival: it never supersedes a run, is never refused
as ``reject`` or ``queue_full`` would refuse a new message, and gets the answer of the message
the key names, wherever that answer is (pending in a queue, published by another process,
already in the store, a reply or the same error). The same key with another body is a client
bug, refused as ``IdempotencyKeyReused`` (422).

Two requests with one key racing, in one process or on several, both miss ``original``; the
store's unique constraint lets one insert win and refuses the other with ``DuplicateMessage``,
which the coordinator answers as a repeat.

A process that must answer a repeat whose message its queue does not hold (stored by another
process whose nudge is still on its way, or whose caller went away before any run took it)
adopts that message as ``enqueue``: it never supersedes a run in flight. Should the message's
own nudge arrive later, the queue already holds it and it is not added twice.

Known limits. A repeat that arrives while its original's insert is still in flight (not yet
committed: the look-up cannot see it) is admitted as a new message would be, so with
``reject`` on a busy session, or a full queue, it may get 409 or 429 where a moment later it
would have joined; a retry joins. A repeat answered from the store says ``superseded: false``
even if its original's caller heard ``true`` (the store keeps which run answered a message,
not which runs it outlived).
"""

from __future__ import annotations

import dataclasses

from threadline.coordination.base import TurnRequest
from threadline.errors import IdempotencyKeyReused
from threadline.queue.job import Answer, RunOptions
from threadline.store import Message, Store


async def original(store: Store, request: TurnRequest) -> Message | None:
    """The stored message the request's idempotency key names, if it has a key.

    Asked before the queue admits the request, so that a repeat is not refused as a new
    message would be (``reject`` while the original runs, ``queue_full``).
    """
    if request.idempotency_key is None:
        return None
    return await store.find_message(request.session_id, request.idempotency_key)


def check_same_body(request: TurnRequest, first: Message) -> None:
    """Refuse a key sent again with a body other than the one it was stored with."""
    if first.fingerprint != request.fingerprint:
        raise IdempotencyKeyReused(
            f"idempotency key {request.idempotency_key!r} names message {str(first.id)!r} "
            "of this session, which was sent with another body; use a new key for a new message"
        )


def options_of(request: TurnRequest, first: Message) -> RunOptions:
    """The run options ``first`` was sent with (the repeat's own, equal in all that the
    fingerprint covers, for a message stored without them)."""
    return RunOptions.from_json(first.options) if first.options else request.options


def replayed(answer: Answer) -> Answer:
    return dataclasses.replace(answer, replayed=True)
