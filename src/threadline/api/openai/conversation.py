"""Which session an OpenAI-style request continues, and what it brings with it.

OpenAI's Chat Completions API is stateless: each request carries the whole conversation.
Threadline keeps the conversation itself, so a request names its session, first found of:

1. the ``X-Session-Id`` header (a session id, or a name: created on demand for the user);
2. ``metadata.session_id`` (the same);
3. the ``user`` field: one ongoing session per end user and agent, named ``openai:<agent>``,
   as a chat channel has one per contact;
4. none: a new session for this request alone.

Only the request's last user message is new. The messages before it are ignored when the
session has a history (the server's is the truth), and become the history of a session that
has none (``Store.seed_history``), so a client can bring a conversation it had elsewhere.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from threadline.api.access import Caller
from threadline.api.validation import StorableText
from threadline.errors import SessionAgentMismatch, SessionNotFound
from threadline.store import NewMessage, Role, Session, Store

# The name of the one ongoing session of an end user (``user``) with an agent.
USER_SESSION = "openai:{agent}"


class ContentPart(BaseModel):
    """A part of a message's content, as both OpenAI APIs send it; only text is used."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: StorableText | None = None


def note(
    session_id: UUID,
    message_id: UUID,
    run_id: UUID | None = None,
    message_ids: tuple[UUID, ...] = (),
) -> dict[str, str]:
    """Threadline's note on a reply (OpenAI's ``metadata``, whose values are strings): the
    session, the message, the run answering it, and every message that run answers (several
    when a burst was merged)."""
    out = {"session_id": str(session_id), "message_id": str(message_id)}
    if run_id is not None:
        out["run_id"] = str(run_id)
    if message_ids:
        out["message_ids"] = ",".join(str(m) for m in message_ids)
        out["merged"] = "true" if len(message_ids) > 1 else "false"
    return out


@dataclass(frozen=True, slots=True)
class Turn:
    """A request's conversation: earlier messages (role, text) and the new user message."""

    earlier: list[tuple[Role, str]]
    content: str


async def find_session(
    store: Store, agent: str, named: str | None, user: str | None, caller: Caller
) -> Session:
    """The session a request continues (see the module docstring), created if need be; one
    ``caller`` may not see is "not found" (before any other check: its agent says nothing)."""
    if named is not None:
        try:
            session = await store.get_session(UUID(named))
        except ValueError:
            session = await store.get_or_create_session(named, agent=agent, user_id=user)
        if session is None or not caller.sees(session):
            raise SessionNotFound(f"session {named!r} not found")
    elif user is not None:
        name = USER_SESSION.format(agent=agent)
        session = await store.get_or_create_session(name, agent=agent, user_id=user)
    else:
        session = await store.create_session(agent)
    if session.agent != agent:
        raise SessionAgentMismatch(session.id, session.agent, agent)
    return session


async def seed(store: Store, session: Session, turn: Turn) -> None:
    """Give a session without history the conversation the client brought (if any)."""
    if turn.earlier:
        rows = [NewMessage(id=uuid.uuid4(), role=r, content=c) for r, c in turn.earlier]
        await store.seed_history(session.id, rows)
