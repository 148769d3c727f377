"""Answers that do not come from this process's own run: over the wire, or from the store.

The owner of a session publishes one JSON document per answered message id; every process
decodes the ones its callers wait for. When a publication was lost, or a run handed off
(``Handoff``: another run answered), the answer is read back from the store with
``Store.answer_for`` and becomes the same ``Answer`` the run's own callers got.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any
from uuid import UUID

from pydantic_ai.messages import ModelMessagesTypeAdapter

from threadline.errors import (
    AgentNotFound,
    AnsweredElsewhere,
    CoordinatorUnavailable,
    FencedOut,
    ModelError,
    ModelTimeout,
    RunCancelled,
    RunFailed,
    SessionNotFound,
    ShuttingDown,
    StoreUnavailable,
    ThreadlineError,
    ToolError,
    Unavailable,
)
from threadline.queue.job import Answer, Outcome, TurnResult
from threadline.runner import turn_result
from threadline.store import Message, Run, Store

# Every error an answer can carry, by code. Each takes a message (run failures a run id too).
_RUN_ERRORS: dict[str, type[RunFailed]] = {
    cls.code: cls
    for cls in (
        RunFailed,
        ModelError,
        ModelTimeout,
        ToolError,
        RunCancelled,
        AnsweredElsewhere,
        FencedOut,
    )
}
_OTHER_ERRORS: dict[str, type[ThreadlineError]] = {
    cls.code: cls
    for cls in (
        Unavailable,
        StoreUnavailable,
        CoordinatorUnavailable,
        ShuttingDown,
        SessionNotFound,
        AgentNotFound,
    )
}


def error_from(code: str | None, message: str, run_id: UUID | None) -> ThreadlineError:
    """Rebuild an error from its stable code (an unknown code is a plain run failure)."""
    other = _OTHER_ERRORS.get(code or "")
    if other is not None:
        return other(message)
    return _RUN_ERRORS.get(code or "", RunFailed)(message, run_id)


def encode_answer(message_id: UUID, answer: Answer | ThreadlineError) -> str:
    """One message's answer (a run's outcome, or an error with no run) as JSON."""
    body: dict[str, Any] = {"message_id": str(message_id)}
    error: ThreadlineError | None
    if isinstance(answer, Answer):
        outcome = answer.outcome
        body.update(
            run_id=str(outcome.run_id),
            message_ids=[str(m) for m in outcome.message_ids],
            superseded=answer.superseded,
        )
        if outcome.result is not None:
            result = asdict(outcome.result)
            result["reply_message_id"] = str(outcome.result.reply_message_id)
            body["result"] = result
        error = outcome.error
    else:
        error = answer
    if error is not None:
        body["error"] = {"code": error.code, "message": str(error)}
    return json.dumps(body)


def decode_answer(body: dict[str, Any]) -> Answer | ThreadlineError:
    message_id = UUID(body["message_id"])
    run_id = UUID(body["run_id"]) if body.get("run_id") else None
    error: ThreadlineError | None = None
    if body.get("error"):
        error = error_from(body["error"]["code"], body["error"]["message"], run_id)
    if run_id is None:
        return error or RunFailed("the run ended without an answer")
    result = None
    if body.get("result"):
        raw = body["result"]
        raw["reply_message_id"] = UUID(raw["reply_message_id"])
        result = TurnResult(**raw)
    outcome = Outcome(run_id, tuple(UUID(m) for m in body.get("message_ids", ())), result, error)
    return Answer(message_id, outcome, bool(body.get("superseded")))


def stored_result(reply: Message, run: Run) -> TurnResult:
    """A committed reply read back from the store, as the run's callers received it."""
    messages = ModelMessagesTypeAdapter.validate_json(reply.payload) if reply.payload else []
    return turn_result(reply.content, reply.id, messages, run.usage or {})


async def stored_answer(store: Store, message_id: UUID) -> Answer | None:
    """The answer the store holds for a message: its reply, or the error of the run that
    answered it by failure. None while the message is unanswered."""
    found = await store.answer_for(message_id)
    if found is None:
        return None
    run, reply = found
    if reply is None:
        error = error_from(run.error_code, run.error or "the run failed", run.id)
        return Answer(message_id, Outcome(run.id, run.message_ids, error=error), False)
    outcome = Outcome(run.id, run.message_ids, stored_result(reply, run))
    return Answer(message_id, outcome, False)
