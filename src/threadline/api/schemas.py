"""Wire schemas. Field names follow automagik-agents so its users can switch."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    WithJsonSchema,
    field_validator,
)

from threadline.api.idempotency import IdempotencyKey
from threadline.api.validation import (
    NOT_BLANK,
    NUL_FREE,
    StorableObject,
    StorableText,
    json_integer,
)
from threadline.config import Strategy
from threadline.store import DeliveryStatus

# Integers are accepted and stored as text (automagik-agents clients send them); the override
# says so, as the annotation alone would document a string only.
USER_ID_SCHEMA = {
    "anyOf": [
        {"type": "string", "maxLength": 200, "pattern": NUL_FREE},
        {"type": "integer"},
        {"type": "null"},
    ],
    "title": "User Id",
}


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_content: StorableText = Field(min_length=1, json_schema_extra={"pattern": NOT_BLANK})
    session_id: UUID | None = None
    session_name: StorableText | None = Field(default=None, min_length=1, max_length=200)
    user_id: Annotated[StorableText | None, WithJsonSchema(USER_ID_SCHEMA)] = Field(
        default=None, max_length=200
    )
    context: StorableObject = Field(default_factory=dict)
    # Constraints before the validator, or pydantic documents them as "ge"/"le".
    message_limit: Annotated[int, Field(ge=0, le=1000), BeforeValidator(json_integer)] | None = None
    channel_payload: StorableObject | None = None
    strategy: Strategy | None = None
    # Answer with Server-Sent Events (also when the request accepts only text/event-stream).
    stream: StrictBool = False
    # Answer 202 as soon as the message is stored; the reply comes by webhook and at
    # GET /messages/{message_id}.
    background: StrictBool = False
    # POSTed the reply (signed) once it commits; the host must be in WEBHOOK_ALLOWED_HOSTS.
    webhook_url: StorableText | None = Field(default=None, min_length=1, max_length=2000)
    idempotency_key: IdempotencyKey | None = None

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id_as_text(cls, value: Any) -> Any:
        # automagik-agents clients send integer user ids; store them as text. A bool is an
        # int to Python but not to JSON: left alone, the string check rejects it.
        return str(value) if type(value) is int else value

    @field_validator("message_content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message_content must not be blank")
        return value


class RunResponse(BaseModel):
    message: str
    session_id: UUID
    run_id: UUID
    message_ids: list[UUID]
    # The message this request stored, or, when it repeated an idempotency key, the one the
    # key names; ``message_ids`` are every message the run answered. None only in a run's
    # own events (``GET /runs/{id}/events``), which no one message owns.
    message_id: UUID | None = None
    success: bool = True
    superseded: bool = False
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    tool_outputs: list[dict[str, Any]] = Field(default_factory=list)
    usage: dict[str, Any] = Field(default_factory=dict)


class BackgroundAccepted(BaseModel):
    """A background request's 202: the message is stored and will be answered."""

    message_id: UUID
    session_id: UUID
    status: Literal["queued"] = "queued"


class AgentInfo(BaseModel):
    name: str
    description: str
    model: str


class MessageOut(BaseModel):
    id: UUID
    seq: int
    role: str
    content: str
    run_id: UUID | None
    created_at: dt.datetime


class SessionOut(BaseModel):
    id: UUID
    name: str | None
    agent: str
    user_id: str | None
    metadata: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


class SessionPage(BaseModel):
    sessions: list[SessionOut]
    total: int
    page: int
    page_size: int


class SessionDetail(SessionOut):
    messages: list[MessageOut]
    total_messages: int
    page: int
    page_size: int


class RunOut(BaseModel):
    id: UUID
    session_id: UUID
    agent: str
    status: str
    message_ids: list[UUID]
    reply_message_id: UUID | None
    superseded_by: UUID | None
    # Why a run that did not succeed ended: a stable code and a message safe to show a user.
    error: str | None
    error_code: str | None
    model: str | None
    usage: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class RunPage(BaseModel):
    runs: list[RunOut]
    total: int
    page: int
    page_size: int


class ReplyOut(BaseModel):
    message_id: UUID
    message: str
    tool_calls: list[dict[str, Any]]
    tool_outputs: list[dict[str, Any]]
    usage: dict[str, Any]


class RunErrorOut(BaseModel):
    code: str
    message: str


class MessageState(BaseModel):
    """A user message and what became of it."""

    id: UUID
    session_id: UUID
    seq: int
    content: str
    created_at: dt.datetime
    # pending: no run has answered it yet; answered: a reply did; failed: its run failed (or
    # was cancelled by a client) and answered it by that failure.
    status: Literal["pending", "answered", "failed"]
    # Once answered: every user message the same run answered (this one included).
    message_ids: list[UUID]
    run: RunOut | None
    reply: ReplyOut | None
    error: RunErrorOut | None


class DeliveryOut(BaseModel):
    id: UUID
    run_id: UUID
    session_id: UUID
    url: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    last_status_code: int | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    # The body as sent (parsed); its bytes are what the signature covers.
    payload: dict[str, Any]


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]
    total: int
    page: int
    page_size: int


class ErrorDetail(BaseModel):
    """``code`` is stable and meant for programs; ``message`` is for people. Some errors add
    fields: ``run_id`` (409, 502, 504), ``details`` (422: every problem found)."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response, whatever its status."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """Every error response under /v1, in OpenAI's shape."""

    error: OpenAIErrorDetail
