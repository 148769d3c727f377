"""The ``Store`` protocol: what the server needs from a database, and the records it returns.

Two implementations stand behind it: ``PostgresStore`` (asyncpg) and ``SQLiteStore`` (aiosqlite).
Both keep the same invariants, which the queue relies on:

* ``seq`` is assigned per session at insert time, under the session row's lock, so the order of
  ``seq`` is the order in which messages were accepted.
* A session's *unanswered* user messages are those with ``seq > sessions.answered_seq``. Runs only
  ever answer a prefix of them, so one integer describes what has been answered.
* ``sessions.current_run_id`` is the fence: a run may commit its reply only while it is the
  session's current run, checked in the same write that stores the reply.
* Opening a run closes the run it fences out, in the same write, if that run is still
  ``queued`` or ``running``: it becomes ``superseded`` by the new run. A process that died
  mid-run thus leaves no run ``running`` once another process has taken the session over. A run
  that already finished keeps its status.

Hot path (a turn on an idle session) is two round-trips: ``add_user_message(..., start=...)``
(insert the message, open the run, read the history window) and ``commit_run``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from uuid import UUID

from threadline.errors import ThreadlineError

Role = Literal["user", "assistant", "tool"]
RunStatus = Literal["queued", "running", "succeeded", "failed", "superseded", "cancelled"]
FINISHED: frozenset[RunStatus] = frozenset({"succeeded", "failed", "superseded", "cancelled"})
# How a run that will not commit ends: ``failed`` answers its messages by failure,
# ``superseded`` hands them to the run that merges them, ``cancelled`` by a client (error code
# ``run_cancelled``) answers them by the cancel, ``cancelled`` by a shutdown leaves them for the
# session's next run.
EndStatus = Literal["failed", "superseded", "cancelled"]
DeliveryStatus = Literal["pending", "delivering", "delivered", "failed"]
# The error code of a run a client cancelled (POST /runs/{id}/cancel): it closes its messages.
RUN_CANCELLED = "run_cancelled"


def closes_messages(status: EndStatus, error: RunError | None) -> bool:
    """Whether a run ending so answers its messages (they are never prompted again)."""
    return status == "failed" or (
        status == "cancelled" and error is not None and error.code == RUN_CANCELLED
    )


@dataclass(frozen=True, slots=True)
class Session:
    id: UUID
    name: str | None
    agent: str
    user_id: str | None
    metadata: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Message:
    id: UUID
    session_id: UUID
    seq: int
    role: Role
    content: str
    run_id: UUID | None
    # pydantic-ai ModelMessage list as JSON bytes (tool calls, tool returns, final response);
    # None for plain user messages.
    payload: bytes | None
    channel_payload: dict[str, Any] | None
    created_at: dt.datetime
    # User messages: the run options their caller asked for (``RunOptions`` as JSON).
    options: dict[str, Any] | None = None
    # User messages sent with an idempotency key: the key (unique within the session) and the
    # hash of the body it was sent with.
    idempotency_key: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Run:
    id: UUID
    session_id: UUID
    agent: str
    status: RunStatus
    message_ids: tuple[UUID, ...]
    upto_seq: int
    reply_message_id: UUID | None
    superseded_by: UUID | None
    error: str | None
    model: str | None
    usage: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    # The stable code the callers of a failed run got (``tool_error``, ``model_timeout``...).
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class RunError:
    """Why a run ended without a reply: a stable code and a message safe to show a user."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to insert; ``seq`` and ``created_at`` are assigned by the store."""

    id: UUID
    role: Role
    content: str
    run_id: UUID | None = None
    payload: bytes | None = None
    channel_payload: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None


class DuplicateMessage(ThreadlineError):
    """``add_user_message`` refused a message: its session holds one with the same
    idempotency key (``existing``). Nothing was written.

    Never reaches a client: the coordinator answers the caller with ``existing``'s answer.
    """

    code = "duplicate_message"

    def __init__(self, existing: Message) -> None:
        super().__init__(
            f"session {str(existing.session_id)!r} already holds message "
            f"{str(existing.id)!r} with idempotency key {existing.idempotency_key!r}"
        )
        self.existing = existing


@dataclass(frozen=True, slots=True)
class RunStart:
    """Open a run answering every unanswered user message with ``seq <= upto_seq``.

    ``upto_seq=None`` in ``add_user_message`` means "up to the message being inserted".
    Opening a run makes it the session's current run (the fence), so any earlier run of the
    session can no longer commit; the run it replaces as current, if still unfinished, is
    finished as ``superseded`` with ``superseded_by`` set to ``run_id``.
    """

    run_id: UUID
    agent: str
    model: str | None
    history_limit: int
    upto_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    """What a run needs to call the model: its row, the context before it, and its prompt."""

    run: Run
    # Everything the model should see before the prompt, in seq order: the last
    # ``history_limit`` rows that are not part of the prompt (answered user messages,
    # assistant replies, tool rows saved from superseded runs).
    history: list[Message]
    # The unanswered user messages this run answers, in seq order.
    prompt: list[Message]


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A webhook delivery to write in the same statement that ends a run (the outbox).

    ``body`` is the exact JSON text that will be signed and sent, built before the statement
    from what it stores; each distinct URL the run's messages asked for gets one.
    """

    id: UUID
    url: str
    body: str


@dataclass(frozen=True, slots=True)
class Delivery:
    id: UUID
    run_id: UUID
    session_id: UUID
    url: str
    body: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    last_status_code: int | None
    created_at: dt.datetime
    # Retries stop ``max_age`` after this: creation, or the last redelivery request.
    retry_from: dt.datetime
    delivered_at: dt.datetime | None
    lease_owner: str | None
    lease_expires_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one send of a claimed delivery went, for ``Store.settle_delivery``.

    Not delivered: it is due again in ``retry_in_s``, unless that falls past ``max_age_s``
    after its ``retry_from``, when it ends ``failed``.
    """

    delivered: bool
    status_code: int | None = None
    error: str | None = None
    retry_in_s: float = 0.0
    max_age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of a successful run, stored by ``commit_run``."""

    message: NewMessage
    usage: dict[str, Any] = field(default_factory=dict)
    # Written with the reply, in the same statement (see ``NewDelivery``).
    deliveries: tuple[NewDelivery, ...] = ()


class Store(Protocol):
    """Async conversation storage. Every method is one round-trip unless it says otherwise."""

    backend: Literal["sqlite", "postgres"]

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if the database cannot answer a trivial query."""

    async def create_session(
        self,
        agent: str,
        *,
        name: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session: ...

    async def get_or_create_session(
        self,
        name: str,
        *,
        agent: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """Return the session named ``name`` for ``user_id``, creating it atomically if absent."""

    async def get_session(self, session_id: UUID) -> Session | None: ...

    async def find_session(self, name: str, user_id: str | None = None) -> Session | None: ...

    async def list_sessions(
        self, *, user_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Session], int]:
        """A page of ``user_id``'s sessions, newest first, and the total count.

        ``user_id`` None (or "") lists the sessions that have no user: one namespace, as in
        ``find_session``, never every user's sessions.
        """

    async def delete_session(self, session_id: UUID) -> bool:
        """Delete a session with its messages and runs; False if it did not exist."""

    async def list_messages(
        self, session_id: UUID, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[Message], int]:
        """A page of messages in seq order, and the total count."""

    async def get_run(self, run_id: UUID) -> Run | None: ...

    async def get_message(self, message_id: UUID) -> Message | None: ...

    async def seed_history(self, session_id: UUID, rows: list[NewMessage]) -> bool:
        """Give a session with no messages a history it did not live (a client that brings
        its own conversation): ``rows`` take seqs 1..n and count as answered, so they are
        context for the next run and never prompted. False, writing nothing, if the session
        has messages already."""

    async def active_run(self, session_id: UUID) -> Run | None:
        """The session's current run (the fence) if it has not ended: the one a cancel stops."""

    async def add_user_message(
        self, session_id: UUID, message: NewMessage, *, start: RunStart | None = None
    ) -> tuple[Message, Turn | None]:
        """Insert a user message with the next ``seq``; optionally open a run in the same write.

        With ``start``, this is the first of the hot path's two round-trips: the run answers
        every unanswered message up to the new one and the returned ``Turn`` carries the history
        window. Raises ``SessionNotFound`` if the session is gone.

        A message whose ``idempotency_key`` the session already holds is not stored: this
        raises ``DuplicateMessage`` naming the stored one, and writes nothing (no run opened,
        ``last_seq`` unchanged). The unique constraint on (session, key) decides between two
        concurrent inserts of one key, on any number of processes.
        """

    async def find_message(self, session_id: UUID, idempotency_key: str) -> Message | None:
        """The session's message stored with ``idempotency_key``, if any."""

    async def start_run(self, session_id: UUID, start: RunStart) -> Turn | None:
        """Open a run for the unanswered messages up to ``start.upto_seq``.

        Returns None (and writes nothing) when there is no such message, e.g. because another
        process already answered it.
        """

    async def commit_run(self, session_id: UUID, run_id: UUID, reply: Reply) -> Message | None:
        """Store the reply and finish the run as ``succeeded``, if the run is still current.

        One atomic write: advances ``answered_seq`` to the run's ``upto_seq``, clears the fence,
        inserts the reply with the next ``seq`` and records ``reply_message_id`` and usage.
        Returns None, writing nothing, when the run was fenced out.
        """

    async def finish_run(
        self,
        session_id: UUID,
        run_id: UUID,
        status: EndStatus,
        *,
        error: RunError | None = None,
        superseded_by: UUID | None = None,
        side_effects: list[NewMessage] | None = None,
        deliveries: list[NewDelivery] | None = None,
    ) -> Run | None:
        """Close a run that will not commit; return it, or None if it had already ended.

        ``failed`` answers the run's messages by failure (``answered_seq`` moves past them, so
        they stay in history but are never prompted again), and so does ``cancelled`` with the
        error code ``run_cancelled`` (``closes_messages``); ``superseded`` and a shutdown's
        ``cancelled`` leave them unanswered for the next run. ``side_effects`` are tool rows
        (calls already executed and their results) that must survive so the next run's model
        knows what was done; they get seqs after the existing rows. Releases the fence if this
        run holds it. ``deliveries`` are written in the same statement, only when this call
        ended the run and the ending closes its messages (never for ``superseded`` or a
        shutdown's ``cancelled``: the next run answers those messages and delivers).
        """

    async def answer_for(self, message_id: UUID) -> tuple[Run, Message | None] | None:
        """The run that answered ``message_id``: succeeded, with its reply, or failed or
        cancelled by a client (None).

        None while the message is unanswered, and for an unknown id. Lets a process find an
        answer it was not told about (a lost notification) without knowing the run's id.
        """

    async def unanswered(self, session_id: UUID) -> list[Message]:
        """The session's unanswered user messages in seq order."""

    async def sessions_with_unanswered(self, limit: int) -> list[UUID]:
        """Up to ``limit`` sessions that hold unanswered user messages (for a process that
        starts alone: whatever is unanswered was left by a process that stopped)."""

    async def list_runs(
        self, session_id: UUID, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Run], int]:
        """A page of the session's runs, oldest first, and the total count."""

    # -- the webhook outbox -----------------------------------------------------------

    async def claim_deliveries(self, owner: str, limit: int, lease_s: float) -> list[Delivery]:
        """Lease up to ``limit`` deliveries to ``owner`` for ``lease_s`` and count an attempt.

        Claims rows that are due (``pending``, ``next_attempt_at`` passed) and rows whose
        lease expired (a sender killed mid-send), oldest due first. A row is leased to one
        claimer at a time, whatever the number of processes.
        """

    async def settle_delivery(self, delivery_id: UUID, owner: str, attempt: Attempt) -> bool:
        """Record how the send went; False (nothing written) if ``owner`` lost the lease."""

    async def get_delivery(self, delivery_id: UUID) -> Delivery | None: ...

    async def list_deliveries(
        self,
        *,
        status: DeliveryStatus | None = None,
        owner: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Delivery], int]:
        """A page of deliveries, newest first, and the total count; with ``owner``, only the
        deliveries of sessions whose ``user_id`` is ``owner`` (a user key's view)."""

    async def redeliver(self, delivery_id: UUID) -> Delivery | None:
        """Make a delivery due now, whatever its status, with a fresh ``max_age``."""

    async def aclose(self) -> None: ...
