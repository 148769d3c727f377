"""OpenAI's Response object, built from threadline's message and the run that answers it.

A response is what a ``POST /v1/responses`` creates: one user message, ``resp_<message hex>``.
The run that answers it can change while it waits (a newer message of the session merges
into a new run), so the run is not the id: the object names it in ``metadata`` (``run_id``,
``message_ids``: every message the run answers, several after a merge), and its output
item is ``msg_<run hex>``.

Status: ``queued`` (stored, no run has it yet), ``in_progress`` (a run answering it is
open), then ``completed``, ``failed`` or ``cancelled`` (a client's cancel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal
from uuid import UUID

from threadline.api.openai.conversation import note
from threadline.errors import ResponseNotFound, RunCancelled
from threadline.queue.job import Answer
from threadline.store import RUN_CANCELLED, Message, Run, Session

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]

RESPONSE_PREFIX = "resp_"
ITEM_PREFIX = "msg_"


def response_id(message_id: UUID) -> str:
    return f"{RESPONSE_PREFIX}{message_id.hex}"


def item_id(run_id: UUID) -> str:
    return f"{ITEM_PREFIX}{run_id.hex}"


def message_id_of(value: str, param: str | None = None) -> UUID:
    """The message a response id names; ``ResponseNotFound`` if it names none we could
    have made (``param``: the request field that carried it)."""
    hex_part = value.removeprefix(RESPONSE_PREFIX)
    if hex_part != value and len(hex_part) == 32:
        try:
            return UUID(hex=hex_part)
        except ValueError:
            pass
    raise _not_found(value, param)


def _not_found(value: str, param: str | None) -> ResponseNotFound:
    what = "previous response" if param == "previous_response_id" else "response"
    return ResponseNotFound(f"{what} {value!r} not found")


def check_user_message(message: Message | None, value: str, param: str | None = None) -> Message:
    if message is None or message.role != "user":
        raise _not_found(value, param)
    return message


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """What a response says about the request that created it, whatever its state."""

    message_id: UUID
    session: Session
    model: str
    created_at: float
    instructions: str | None = None
    # Known to the request that creates the response; a later read says null.
    background: bool | None = None
    previous_response_id: str | None = None
    user: str | None = None

    @classmethod
    def of_message(cls, message: Message, session: Session) -> Origin:
        options = message.options or {}
        return cls(
            message.id,
            session,
            options.get("agent", session.agent),
            message.created_at.timestamp(),
            options.get("instructions"),
            user=options.get("user_id"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """How the run that answered a response ended: its reply, or why there is none."""

    status: Literal["completed", "failed", "cancelled"]
    run_id: UUID
    message_ids: tuple[UUID, ...]
    text: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    finished_at: float | None = None

    @classmethod
    def of_answer(cls, answer: Answer, finished_at: float) -> Ending:
        outcome = answer.outcome
        if outcome.error is None:
            assert outcome.result is not None, "an outcome without an error carries a reply"
            result = outcome.result
            return cls(
                "completed", outcome.run_id, outcome.message_ids, result.message, result.usage,
                finished_at=finished_at,
            )  # fmt: skip
        if isinstance(outcome.error, RunCancelled):
            return cls("cancelled", outcome.run_id, outcome.message_ids, finished_at=finished_at)
        error = {"code": outcome.error.code, "message": str(outcome.error)}
        return cls(
            "failed", outcome.run_id, outcome.message_ids, error=error, finished_at=finished_at
        )

    @classmethod
    def of_run(cls, run: Run, reply: Message | None) -> Ending:
        finished_at = run.finished_at.timestamp() if run.finished_at is not None else None
        if reply is not None:
            return cls(
                "completed", run.id, run.message_ids, reply.content, run.usage or {},
                finished_at=finished_at,
            )  # fmt: skip
        if run.error_code == RUN_CANCELLED:
            return cls("cancelled", run.id, run.message_ids, finished_at=finished_at)
        error = {"code": run.error_code or "run_failed", "message": run.error or "the run failed"}
        return cls("failed", run.id, run.message_ids, error=error, finished_at=finished_at)


def output_message(run_id: UUID, text: str | None, status: ItemStatus) -> dict[str, Any]:
    """The assistant message a run outputs; ``text`` None: no content part yet."""
    content = [] if text is None else [output_text(text)]
    return {
        "type": "message",
        "id": item_id(run_id),
        "role": "assistant",
        "status": status,
        "content": content,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(raw: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = raw.get("input_tokens") or 0, raw.get("output_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def metadata(
    origin: Origin, run_id: UUID | None, message_ids: tuple[UUID, ...] = ()
) -> dict[str, str]:
    """``conversation.note`` for the run answering (or that answered) the response."""
    return note(origin.session.id, origin.message_id, run_id, message_ids)


def response_object(
    origin: Origin,
    status: Status,
    *,
    ending: Ending | None = None,
    run_id: UUID | None = None,
    message_ids: tuple[UUID, ...] = (),
    output: list[dict[str, Any]] | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Response object; with ``ending``, of a response whose run has ended, else of one
    still waiting (``run_id``: the run answering it now, if one is open)."""
    if ending is not None:
        run_id, message_ids, error = ending.run_id, ending.message_ids, ending.error
        if output is None and ending.text is not None:
            output = [output_message(ending.run_id, ending.text, "completed")]
    session = origin.session
    return {
        "id": response_id(origin.message_id),
        "object": "response",
        "created_at": origin.created_at,
        "status": status,
        "background": origin.background,
        "completed_at": ending.finished_at if ending is not None else None,
        "conversation": {"id": session.name if session.name is not None else str(session.id)},
        "error": error,
        "incomplete_details": None,
        "instructions": origin.instructions,
        "max_output_tokens": None,
        "metadata": metadata(origin, run_id, message_ids),
        "model": origin.model,
        "output": output or [],
        # The agent's own tools, run by the server (several at once, as pydantic-ai does).
        "parallel_tool_calls": True,
        "previous_response_id": origin.previous_response_id,
        "store": True,
        "temperature": None,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "usage": usage(ending.usage) if ending is not None and ending.usage is not None else None,
        "user": origin.user,
    }
