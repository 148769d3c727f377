"""Answers on the wire: how a run's answer for one message travels between processes.

The owner of a session publishes one JSON document per answered message id; every process
decodes the ones its callers wait for. A reply read back from PostgreSQL (when a publication
was lost) becomes the same ``TurnResult`` the run's own callers got.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any
from uuid import UUID

from pydantic_ai.messages import ModelMessagesTypeAdapter

from threadline.errors import (
    Fenced,
    ModelError,
    ModelTimeout,
    RunFailed,
    ShuttingDown,
    ThreadlineError,
)
from threadline.queue.core import Answer, Outcome
from threadline.runner import TurnResult
from threadline.store import Message, Run

_ERRORS: dict[str, type[ThreadlineError]] = {
    cls.code: cls for cls in (RunFailed, ModelError, ModelTimeout, Fenced, ShuttingDown)
}


def encode_answer(answer: Answer | None, error: BaseException | None, message_id: UUID) -> str:
    body: dict[str, Any] = {"message_id": str(message_id)}
    if answer is not None:
        outcome = answer.outcome
        body.update(
            run_id=str(outcome.run_id),
            message_ids=[str(m) for m in outcome.message_ids],
            superseded=answer.superseded,
        )
        if isinstance(outcome.result, TurnResult):
            result = asdict(outcome.result)
            result["reply_message_id"] = str(outcome.result.reply_message_id)
            body["result"] = result
        error = outcome.error
    if error is not None:
        code = error.code if isinstance(error, ThreadlineError) else RunFailed.code
        body["error"] = {"code": code, "message": str(error)}
    return json.dumps(body)


def decode_answer(body: dict[str, Any]) -> Answer | ThreadlineError:
    message_id = UUID(body["message_id"])
    run_id = UUID(body["run_id"]) if body.get("run_id") else None
    error: ThreadlineError | None = None
    if body.get("error"):
        kind = _ERRORS.get(body["error"]["code"], RunFailed)
        message = body["error"]["message"]
        error = kind(message, run_id) if issubclass(kind, RunFailed) else kind(message)
    if run_id is None:
        return error or RunFailed("run ended without an answer")
    result = None
    if body.get("result"):
        raw = body["result"]
        raw["reply_message_id"] = UUID(raw["reply_message_id"])
        result = TurnResult(**raw)
    outcome = Outcome(
        run_id,
        tuple(UUID(m) for m in body.get("message_ids", ())),
        result,
        error if isinstance(error, RunFailed) else None,
    )
    return Answer(message_id, outcome, bool(body.get("superseded")))


def stored_result(reply: Message, run: Run) -> TurnResult:
    """A committed reply read back from the store, as the run's callers received it."""
    messages = ModelMessagesTypeAdapter.validate_json(reply.payload) if reply.payload else []
    return TurnResult.build(reply.content, reply.id, messages, run.usage or {})
