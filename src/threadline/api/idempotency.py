"""Idempotency keys on the wire: the ``Idempotency-Key`` header or the ``idempotency_key``
field, what a key may hold, and the ``Idempotent-Replayed`` header of a repeat's answer.

What a repeated key does is coordination's business (``coordination/replay.py``); here it is
only read, checked and scoped. A key is scoped to a session, so a request with a key must name
its session (``session_id``, or ``session_name``: a channel passes its chat id): without one,
every request would open a new session and no repeat could ever be recognised.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header
from pydantic import Field

from threadline.errors import InvalidIdempotencyKey

MAX_LENGTH = 255
# Printable ASCII, no space at either end: a provider's message id (``wamid.HBgL...==``, a
# Slack event id, a UUID) fits, and a header carries it unchanged (HTTP trims the spaces
# around a header value and has no portable encoding for other characters).
PATTERN = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
DESCRIPTION = (
    "Names the message within its session (a channel passes its provider's message id). A "
    "request repeating a key stores nothing and gets the answer of the message the key names "
    "(`Idempotent-Replayed: true`); with another body it gets 422 `idempotency_key_reused`. "
    "Needs `session_id` or `session_name`. Also accepted as the `Idempotency-Key` header."
)

IdempotencyKey = Annotated[
    str, Field(min_length=1, max_length=MAX_LENGTH, pattern=PATTERN, description=DESCRIPTION)
]

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_LENGTH,
        pattern=PATTERN,
        description="The same as the body's `idempotency_key`; give either, or both equal.",
    ),
]

REPLAYED_HEADER = "Idempotent-Replayed"
# The 200 response's headers, for a route whose 200 may be a repeat's answer.
REPLAYED_HEADERS: dict[str, Any] = {
    REPLAYED_HEADER: {
        "schema": {"type": "string", "enum": ["true"]},
        "description": (
            "Present on the answer to a request that repeated an idempotency key: nothing "
            "was stored, the body is the answer of the message the key names (blocking "
            "replies only: a stream follows that message without it)."
        ),
    }
}


def request_key(field: str | None, header: str | None, *, has_session: bool) -> str | None:
    """The request's idempotency key, from the body or the header; None without one."""
    if field is not None and header is not None and field != header:
        raise InvalidIdempotencyKey(
            f"the Idempotency-Key header {header!r} and the idempotency_key field {field!r} "
            "differ; send one, or both equal"
        )
    key = field if field is not None else header
    if key is not None and not has_session:
        raise InvalidIdempotencyKey(
            "an idempotency key names a message within a session: send session_id or "
            "session_name with it"
        )
    return key
