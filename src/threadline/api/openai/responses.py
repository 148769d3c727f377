"""``/v1/responses``: OpenAI's Responses API, served by the session queue.

A response is one user message (``resp_<message hex>``, ``response_object.py``); the run that
answers it may answer others too (cancel-and-merge), and the Response's ``metadata`` names it.

Which session a request continues: ``previous_response_id`` (the session of that response's
message: the session goes on from its newest state, it does not fork at that response), or
``conversation`` (a session id, or a name: created on demand for ``user``), or neither (a new
session). Both at once is a 400.

``input`` is a string, or a list of messages (role ``user``, ``assistant``, ``system`` or
``developer``, content a string or ``input_text``/``output_text`` parts). The last must be a
user message: it is the new one. Earlier user and assistant messages become the history of a
session that has none (``conversation.py``); system and developer messages are added to the
run's ``instructions``. ``instructions`` are appended to the agent's own for the run that
answers this message; when a burst of messages is merged into one run, the newest message's
instructions apply (it is the newest message's caller whose options a run takes).

``stream`` answers with OpenAI's semantic events (``response_events.py``). ``background``
returns the Response at once, status ``queued``; ``GET /v1/responses/{id}`` polls it and
``POST /v1/responses/{id}/cancel`` cancels the run answering it (its messages are answered by
the cancel, as ``POST /api/v1/runs/{id}/cancel`` does). Streamed, a response goes on if the
client goes away, so ``stream`` and ``background`` together are a stream that can be polled.

Fields a request may carry: ``model``, ``input``, ``conversation``, ``previous_response_id``,
``instructions``, ``stream``, ``background``, ``user``, ``store`` (not ``false``: every
response is stored), ``text`` (format ``text`` only), ``tools`` (empty only: the agent's own
tools apply). Any other is a 400 naming it, never a silent ignore.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sse_starlette import EventSourceResponse

from threadline.api.access import Caller
from threadline.api.cancel import cancel_and_wait
from threadline.api.contract import openai_errors
from threadline.api.deps import CallerDep, ServicesDep
from threadline.api.errors import PayloadTooLarge
from threadline.api.jsonbody import json_body
from threadline.api.openai.conversation import ContentPart, Turn, find_session, seed
from threadline.api.openai.response_events import semantic_events
from threadline.api.openai.response_object import (
    Ending,
    Origin,
    check_user_message,
    message_id_of,
    response_object,
)
from threadline.api.streams import TurnStream
from threadline.api.validation import StorableText
from threadline.coordination import TurnRequest
from threadline.coordination.background import submit_in_background
from threadline.errors import (
    BadParameter,
    ResponseNotFound,
    RunNotActive,
    SessionAgentMismatch,
    UnsupportedParameter,
)
from threadline.store import Message, Role, Session, Store

router = APIRouter()

Name = Annotated[StorableText, Field(min_length=1, max_length=200)]


class InputItem(BaseModel):
    # A client's copy of earlier items may carry what OpenAI returned (id, status, phase...):
    # the server's history is the truth for a session that has one, so they are not used.
    model_config = ConfigDict(extra="allow")

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: StorableText | list[ContentPart] | None = None


class ConversationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Name


class ResponseRequest(BaseModel):
    # A field not declared here is refused (400 ``unsupported_parameter`` naming it).
    model_config = ConfigDict(extra="forbid")

    model: StorableText
    input: StorableText | list[InputItem]
    conversation: Name | ConversationRef | None = None
    previous_response_id: StorableText | None = None
    instructions: StorableText | None = None
    stream: StrictBool = False
    background: StrictBool = False
    user: Name | None = None
    store: StrictBool | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


def refuse_unsupported(body: ResponseRequest) -> None:
    """The declared fields whose values ask for what the server cannot do."""
    if body.store is False:
        raise UnsupportedParameter("store", ": every response is stored (store=false)")
    if body.tools:
        raise UnsupportedParameter("tools", ": the agent's own tools apply")
    for key, value in (body.text or {}).items():
        if key != "format":
            raise UnsupportedParameter(f"text.{key}")
        if not isinstance(value, dict) or value.get("type") != "text" or len(value) > 1:
            raise UnsupportedParameter("text.format", ": only {'type': 'text'} is")
    if body.conversation is not None and body.previous_response_id is not None:
        raise BadParameter(
            "give conversation or previous_response_id, not both", "previous_response_id"
        )


def _text_of(item: InputItem, i: int) -> str:
    if item.content is None:
        return ""
    if isinstance(item.content, str):
        return item.content
    texts = []
    for j, part in enumerate(item.content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            why = f": only input_text and output_text parts are ({part.type!r} given)"
            raise UnsupportedParameter(f"input[{i}].content[{j}].type", why)
        texts.append(part.text)
    return "".join(texts)


def read_input(value: str | list[InputItem]) -> tuple[Turn, list[str]]:
    """The new user message with the history before it, and the system and developer
    messages (instructions for this run)."""
    earlier: list[tuple[Role, str]] = []
    instructions: list[str] = []
    if isinstance(value, str):
        content = value
    else:
        if not value:
            raise BadParameter("input has no items", "input")
        for i, item in enumerate(value):
            if item.type != "message":
                raise UnsupportedParameter(
                    f"input[{i}].type", f": only messages are ({item.type!r} given)"
                )
            if item.role is None:
                raise BadParameter(f"input[{i}] has no role", f"input[{i}].role")
            text = _text_of(item, i)
            if item.role == "system" or item.role == "developer":
                instructions.append(text)
            elif i < len(value) - 1:
                earlier.append((item.role, text))
        if value[-1].role != "user":
            raise BadParameter("the last input item must be a user message", "input")
        content = _text_of(value[-1], len(value) - 1)
    if not content.strip():
        raise BadParameter("the new user message is empty", "input")
    return Turn(earlier, content), instructions


async def find_or_start_session(
    store: Store, body: ResponseRequest, user: str | None, caller: Caller
) -> Session:
    """The session the request continues (see the module docstring), for ``user``; one that
    ``caller`` may not see is "not found"."""
    if body.previous_response_id is not None:
        previous = body.previous_response_id
        message_id = message_id_of(previous, "previous_response_id")
        message = await store.get_message(message_id)
        message = check_user_message(message, previous, "previous_response_id")
        session = await store.get_session(message.session_id)
        if session is None or not caller.sees(session):
            raise ResponseNotFound(f"previous response {previous!r} not found")
        if session.agent != body.model:
            raise SessionAgentMismatch(session.id, session.agent, body.model)
        return session
    if body.conversation is not None:
        named = body.conversation
        name = named if isinstance(named, str) else named.id
        return await find_session(store, body.model, name, user, caller)
    return await store.create_session(body.model, user_id=user)


@router.post(
    "/responses",
    response_model=None,
    responses=openai_errors(400, 404, 409, 413, 429, 502, 503, 504),
)
async def create_response(
    body: ResponseRequest, services: ServicesDep, caller: CallerDep
) -> dict[str, Any] | JSONResponse | EventSourceResponse:
    created_at = time.time()
    settings, store = services.settings, services.store
    refuse_unsupported(body)
    user = caller.user_for(body.user, "user")
    turn, more = read_input(body.input)
    instructions = "\n\n".join([*([body.instructions] if body.instructions else []), *more])
    await services.registry.get(body.model)  # 404 before anything is stored
    for name, text in (("input", turn.content), ("instructions", instructions)):
        if len(text) > settings.max_message_chars:
            raise PayloadTooLarge(
                f"{name} has {len(text)} characters; the limit is {settings.max_message_chars}"
            )
    session = await find_or_start_session(store, body, user, caller)
    await seed(store, session, turn)
    request = TurnRequest(
        session_id=session.id,
        agent=body.model,
        content=turn.content,
        strategy=settings.queue_strategy,
        user_id=user if user is not None else session.user_id,
        history_limit=settings.history_limit,
        stream=body.stream,
        instructions=instructions or None,
    )

    def origin(message_id: UUID) -> Origin:
        return Origin(
            message_id,
            session,
            body.model,
            created_at,
            request.instructions,
            body.background,
            body.previous_response_id,
            request.user_id,
        )

    if body.stream:
        stream = TurnStream(services.coordinator, request)
        await stream.start()  # errors before the message is stored are still statuses
        assert stream.message_id is not None
        headers = {"X-Session-Id": str(session.id)}
        events = semantic_events(stream, origin(stream.message_id))
        return EventSourceResponse(events, ping=settings.stream_heartbeat_s, headers=headers)
    if body.background:
        message_id = await submit_in_background(services.coordinator, request)
        return response_object(origin(message_id), "queued")
    answer = await services.coordinator.submit(request)
    if answer.outcome.error is not None:
        raise answer.outcome.error
    ending = Ending.of_answer(answer, time.time())
    completed = response_object(origin(answer.message_id), "completed", ending=ending)
    return json_body(settings.json_encoder, completed)


async def _find(store: Store, response_id: str, caller: Caller) -> tuple[Message, Session]:
    message = await store.get_message(message_id_of(response_id))
    message = check_user_message(message, response_id)
    session = await store.get_session(message.session_id)
    if session is None or not caller.sees(session):
        raise ResponseNotFound(f"response {response_id!r} not found")
    return message, session


async def _state(store: Store, message: Message, session: Session) -> dict[str, Any]:
    """The Response as the store has it now."""
    origin = Origin.of_message(message, session)
    found = await store.answer_for(message.id)
    if found is not None:
        ending = Ending.of_run(*found)
        return response_object(origin, ending.status, ending=ending)
    run = await store.active_run(session.id)
    if run is not None and message.id in run.message_ids:
        return response_object(origin, "in_progress", run_id=run.id, message_ids=run.message_ids)
    return response_object(origin, "queued")


@router.get("/responses/{response_id}", response_model=None, responses=openai_errors(400, 404, 503))
async def retrieve_response(
    response_id: StorableText,
    services: ServicesDep,
    caller: CallerDep,
    stream: Annotated[bool | None, Query()] = None,
    starting_after: Annotated[int | None, Query()] = None,
    include: Annotated[list[StorableText] | None, Query()] = None,
) -> dict[str, Any]:
    """A response as it is now: poll it until its status is no longer queued or in_progress."""
    if stream or starting_after is not None:
        name = "stream" if stream else "starting_after"
        raise UnsupportedParameter(name, ": a response is polled, not streamed again")
    if include:
        raise UnsupportedParameter("include")
    message, session = await _find(services.store, response_id, caller)
    return await _state(services.store, message, session)


@router.post(
    "/responses/{response_id}/cancel",
    response_model=None,
    responses=openai_errors(404, 409, 503),
)
async def cancel_response(
    response_id: StorableText, services: ServicesDep, caller: CallerDep
) -> dict[str, Any]:
    """Cancel the run answering a response (and so every message merged into it); answers
    with the Response once the run has ended (status ``cancelled``), or as it is after 10 s.
    A cancelled response is returned as it is; one that completed or failed is a 409."""
    store = services.store
    message, session = await _find(store, response_id, caller)
    found = await store.answer_for(message.id)
    if found is not None:
        ending = Ending.of_run(*found)
        if ending.status != "cancelled":
            raise RunNotActive(f"response {response_id!r} has ended: {ending.status}")
        return response_object(Origin.of_message(message, session), "cancelled", ending=ending)
    run = await store.active_run(session.id)
    if run is None or message.id not in run.message_ids:
        raise RunNotActive(f"response {response_id!r} is queued: no run has started on it yet")
    await cancel_and_wait(services, run)
    return await _state(store, message, session)
