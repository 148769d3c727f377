"""Routes under /api/v1: validate, call, map. Nothing else."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from threadline import logs
from threadline.api.access import Caller
from threadline.api.cancel import cancel_and_wait
from threadline.api.contract import errors
from threadline.api.deps import CallerDep, Services, ServicesDep, require_api_key
from threadline.api.errors import PayloadTooLarge
from threadline.api.idempotency import (
    REPLAYED_HEADER,
    REPLAYED_HEADERS,
    IdempotencyKeyHeader,
    request_key,
)
from threadline.api.schemas import (
    AgentInfo,
    BackgroundAccepted,
    DeliveryOut,
    DeliveryPage,
    MessageOut,
    MessageState,
    ReplyOut,
    RunErrorOut,
    RunOut,
    RunPage,
    RunRequest,
    RunResponse,
    SessionDetail,
    SessionOut,
    SessionPage,
)
from threadline.api.streams import (
    TurnStream,
    message_events,
    reply,
    run_events,
)
from threadline.api.validation import StorableText, max_page
from threadline.coordination import TurnRequest
from threadline.coordination.answers import stored_result
from threadline.coordination.background import submit_in_background
from threadline.delivery.targets import check_webhook_url
from threadline.errors import (
    DeliveryNotFound,
    MessageNotFound,
    RunNotActive,
    RunNotFound,
    SessionAgentMismatch,
    SessionNotFound,
)
from threadline.store import FINISHED, Delivery, DeliveryStatus, Run, Session, Store

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_api_key)])

# Largest page sizes; ``page`` is bounded so that the offset fits 64 bits (api/validation.py).
SESSIONS_PER_PAGE = 500
MESSAGES_PER_PAGE = 1000
RUNS_PER_PAGE = 500
DELIVERIES_PER_PAGE = 500

_ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {
        "model": BackgroundAccepted,
        "description": "`background: true`: the message is stored and will be answered; "
        "follow it at GET /api/v1/messages/{message_id} (and by webhook).",
    }
}


async def _find_session(
    store: Store, id_or_name: str, user_id: str | None, caller: Caller
) -> Session:
    """A session by id, or by name among ``user_id``'s; a user key finds only its own (another
    user's is "not found": its existence is not the caller's to learn)."""
    user_id = caller.user_for(user_id)
    try:
        session = await store.get_session(UUID(id_or_name))
    except ValueError:
        session = await store.find_session(id_or_name, user_id)
    if session is None or not caller.sees(session):
        raise SessionNotFound(f"session {id_or_name!r} not found")
    logs.bind(session_id=session.id)
    return session


async def _check_session(store: Store, session_id: UUID, caller: Caller) -> None:
    """That ``caller`` may see the session a run, message or delivery belongs to."""
    if caller.role == "admin":
        return  # no round-trip for the common case
    session = await store.get_session(session_id)
    if session is None or not caller.sees(session):
        raise SessionNotFound(f"session {str(session_id)!r} not found")


# One event of a stream, as OpenAPI 3.2 describes Server-Sent Events; ``data`` is JSON text.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
# How an SSE route documents its body; the events are listed in the README.
EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events (see README, Streaming).",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
}


def _wants_stream(body: RunRequest, request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return body.stream or ("text/event-stream" in accept and "json" not in accept)


@router.post(
    "/agent/{name}/run",
    response_model=RunResponse,
    responses={
        **errors(400, 404, 409, 413, 422, 429, 502, 503, 504),
        **_ACCEPTED,
        200: {
            "description": "The reply; with `stream`, Server-Sent Events (README, Streaming).",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
            "headers": REPLAYED_HEADERS,
        },
    },
)
async def run_agent(
    name: Annotated[str, Path(examples=["echo"])],
    body: RunRequest,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> RunResponse | EventSourceResponse | JSONResponse:
    settings, store = services.settings, services.store
    user_id = caller.user_for(body.user_id)
    # 404 (unknown) or 503 (setup failing) before anything is stored.
    await services.registry.get(name)
    key = request_key(
        body.idempotency_key,
        idempotency_key,
        has_session=body.session_id is not None or body.session_name is not None,
    )
    if len(body.message_content) > settings.max_message_chars:
        raise PayloadTooLarge(
            f"message_content has {len(body.message_content)} characters; "
            f"the limit is {settings.max_message_chars}"
        )
    if body.webhook_url is not None:
        check_webhook_url(
            body.webhook_url,
            settings.webhook_allowed_hosts,
            secret_set=settings.webhook_secret is not None,
        )
    if body.session_id is not None:
        session = await store.get_session(body.session_id)
        if session is None or not caller.sees(session):
            raise SessionNotFound(f"session {str(body.session_id)!r} not found")
    elif body.session_name is not None:
        session = await store.get_or_create_session(body.session_name, agent=name, user_id=user_id)
    else:
        session = await store.create_session(name, user_id=user_id)
    if session.agent != name:
        # Another agent's history is not this one's to extend (or to read back as context).
        raise SessionAgentMismatch(session.id, session.agent, name)
    logs.bind(session_id=session.id)
    turn = TurnRequest(
        session_id=session.id,
        agent=name,
        content=body.message_content,
        strategy=body.strategy or settings.queue_strategy,
        user_id=user_id if user_id is not None else session.user_id,
        context=body.context,
        history_limit=(
            body.message_limit if body.message_limit is not None else settings.history_limit
        ),
        channel_payload=body.channel_payload,
        webhook_url=body.webhook_url,
        idempotency_key=key,
    )
    if body.background:
        message_id = await submit_in_background(services.coordinator, turn)
        accepted = BackgroundAccepted(message_id=message_id, session_id=session.id)
        return JSONResponse(accepted.model_dump(mode="json"), status_code=202)
    if _wants_stream(body, request):
        stream = TurnStream(services.coordinator, turn)
        await stream.start()  # errors before the message is stored are still statuses
        return stream.response(settings.stream_heartbeat_s)
    answer = await services.coordinator.submit(turn)
    logs.bind(run_id=answer.outcome.run_id)
    if answer.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    if answer.outcome.error is not None:
        raise answer.outcome.error
    return reply(answer, session.id)


@router.get("/agents", response_model=list[AgentInfo])
@router.get("/agent/list", response_model=list[AgentInfo], include_in_schema=False)
async def list_agents(services: ServicesDep) -> list[AgentInfo]:
    default = services.settings.model
    return [
        AgentInfo(
            name=spec.name,
            description=spec.description,
            model=spec.model
            if isinstance(spec.model, str)
            else (spec.model.model_name if spec.model is not None else default),
        )
        for spec in services.registry.specs
    ]


@router.get("/sessions", response_model=SessionPage, responses=errors(422, 503))
async def list_sessions(
    services: ServicesDep,
    caller: CallerDep,
    user_id: StorableText | None = None,
    page: Annotated[int, Query(ge=1, le=max_page(SESSIONS_PER_PAGE))] = 1,
    page_size: Annotated[int, Query(ge=1, le=SESSIONS_PER_PAGE)] = 50,
) -> SessionPage:
    """Sessions of ``user_id``; without it, only sessions that have no user."""
    sessions, total = await services.store.list_sessions(
        user_id=caller.user_for(user_id), limit=page_size, offset=(page - 1) * page_size
    )
    return SessionPage(
        sessions=[SessionOut.model_validate(s, from_attributes=True) for s in sessions],
        total=total,
        page=page,
        page_size=page_size,
    )


@router.get("/sessions/{id_or_name}", response_model=SessionDetail, responses=errors(404, 422, 503))
async def get_session(
    id_or_name: StorableText,
    services: ServicesDep,
    caller: CallerDep,
    user_id: StorableText | None = None,
    page: Annotated[int, Query(ge=1, le=max_page(MESSAGES_PER_PAGE))] = 1,
    page_size: Annotated[int, Query(ge=1, le=MESSAGES_PER_PAGE)] = 100,
) -> SessionDetail:
    session = await _find_session(services.store, id_or_name, user_id, caller)
    messages, total = await services.store.list_messages(
        session.id, limit=page_size, offset=(page - 1) * page_size
    )
    fields: dict[str, Any] = SessionOut.model_validate(session, from_attributes=True).model_dump()
    return SessionDetail(
        **fields,
        messages=[MessageOut.model_validate(m, from_attributes=True) for m in messages],
        total_messages=total,
        page=page,
        page_size=page_size,
    )


@router.delete("/sessions/{id_or_name}", status_code=204, responses=errors(404, 422, 503))
async def delete_session(
    id_or_name: StorableText,
    services: ServicesDep,
    caller: CallerDep,
    user_id: StorableText | None = None,
) -> Response:
    session = await _find_session(services.store, id_or_name, user_id, caller)
    await services.store.delete_session(session.id)
    return Response(status_code=204)


@router.get("/runs/{run_id}", response_model=RunOut, responses=errors(404, 422, 503))
async def get_run(run_id: UUID, services: ServicesDep, caller: CallerDep) -> RunOut:
    run = await _find_run(services.store, run_id, caller)
    return RunOut.model_validate(run, from_attributes=True)


@router.get(
    "/runs/{run_id}/events",
    response_class=EventSourceResponse,
    responses={**EVENT_STREAM, **errors(404, 422, 503)},
)
async def run_event_stream(
    run_id: UUID,
    services: ServicesDep,
    caller: CallerDep,
    last_event_id: Annotated[StorableText | None, Header()] = None,
) -> EventSourceResponse:
    """A run's events from any process: at once its end if it has ended; else what it
    streamed so far (after ``Last-Event-ID``), then live until it ends."""
    run = await _find_run(services.store, run_id, caller)
    events = run_events(services.coordinator, services.store, run, last_event_id)
    return EventSourceResponse(events, ping=services.settings.stream_heartbeat_s)


@router.get(
    "/messages/{message_id}/events",
    response_class=EventSourceResponse,
    responses={**EVENT_STREAM, **errors(404, 422, 503)},
)
async def message_event_stream(
    message_id: UUID,
    services: ServicesDep,
    caller: CallerDep,
    last_event_id: Annotated[StorableText | None, Header()] = None,
) -> EventSourceResponse:
    """A message's stream joined from any process: every run that covers it until one
    answers it (at once, if it is answered already)."""
    message = await services.store.get_message(message_id)
    if message is None or message.role != "user":
        raise MessageNotFound(f"message {str(message_id)!r} not found")
    await _check_message(services.store, message.session_id, message_id, caller)
    events = message_events(
        services.coordinator, services.store, message.session_id, message.id, last_event_id
    )
    return EventSourceResponse(events, ping=services.settings.stream_heartbeat_s)


@router.post("/runs/{run_id}/cancel", response_model=RunOut, responses=errors(404, 409, 422, 503))
async def cancel_run(
    run_id: UUID, response: Response, services: ServicesDep, caller: CallerDep
) -> RunOut:
    """Stop a run in flight on whichever process runs it. Its messages are answered by the
    cancel (``run_cancelled``); messages that arrived after it go to the next run. Answers
    with the run once it has ended (202 and the run as it is, if that takes over 10 s)."""
    run = await _find_run(services.store, run_id, caller)
    return await _cancel(services, run, response)


@router.post(
    "/sessions/{id_or_name}/cancel", response_model=RunOut, responses=errors(404, 409, 422, 503)
)
async def cancel_session(
    id_or_name: StorableText,
    response: Response,
    services: ServicesDep,
    caller: CallerDep,
    user_id: StorableText | None = None,
) -> RunOut:
    """Stop the session's run in flight, as ``POST /runs/{run_id}/cancel`` does."""
    session = await _find_session(services.store, id_or_name, user_id, caller)
    run = await services.store.active_run(session.id)
    if run is None:
        raise RunNotActive(f"session {str(session.id)!r} has no run in flight")
    return await _cancel(services, run, response)


async def _find_run(store: Store, run_id: UUID, caller: Caller) -> Run:
    run = await store.get_run(run_id)
    if run is None:
        raise RunNotFound(f"run {str(run_id)!r} not found")
    try:
        await _check_session(store, run.session_id, caller)
    except SessionNotFound:
        raise RunNotFound(f"run {str(run_id)!r} not found") from None
    logs.bind(session_id=run.session_id, run_id=run.id)
    return run


async def _check_message(store: Store, session_id: UUID, message_id: UUID, caller: Caller) -> None:
    try:
        await _check_session(store, session_id, caller)
    except SessionNotFound:
        raise MessageNotFound(f"message {str(message_id)!r} not found") from None


async def _cancel(services: Services, run: Run, response: Response) -> RunOut:
    now = await cancel_and_wait(services, run)
    if now.status not in FINISHED:
        response.status_code = 202
    return RunOut.model_validate(now, from_attributes=True)


@router.get("/sessions/{id_or_name}/runs", response_model=RunPage, responses=errors(404, 422, 503))
async def list_runs(
    id_or_name: StorableText,
    services: ServicesDep,
    caller: CallerDep,
    user_id: StorableText | None = None,
    page: Annotated[int, Query(ge=1, le=max_page(RUNS_PER_PAGE))] = 1,
    page_size: Annotated[int, Query(ge=1, le=RUNS_PER_PAGE)] = 50,
) -> RunPage:
    """The session's runs, oldest first (a session is found as in GET /sessions/{id_or_name})."""
    session = await _find_session(services.store, id_or_name, user_id, caller)
    runs, total = await services.store.list_runs(
        session.id, limit=page_size, offset=(page - 1) * page_size
    )
    return RunPage(
        runs=[RunOut.model_validate(r, from_attributes=True) for r in runs],
        total=total,
        page=page,
        page_size=page_size,
    )


@router.get("/messages/{message_id}", response_model=MessageState, responses=errors(404, 422, 503))
async def get_message(message_id: UUID, services: ServicesDep, caller: CallerDep) -> MessageState:
    """A user message's state: pending, or answered (by a reply) or failed, with its run."""
    store = services.store
    message = await store.get_message(message_id)
    if message is None or message.role != "user":
        raise MessageNotFound(f"user message {str(message_id)!r} not found")
    await _check_message(store, message.session_id, message_id, caller)
    found = await store.answer_for(message_id)
    run = reply = error = None
    message_ids: list[UUID] = []
    status: Literal["pending", "answered", "failed"] = "pending"
    if found is not None:
        stored_run, stored_reply = found
        run = RunOut.model_validate(stored_run, from_attributes=True)
        message_ids = list(stored_run.message_ids)
        if stored_reply is not None:
            status = "answered"
            result = stored_result(stored_reply, stored_run)
            reply = ReplyOut(
                message_id=result.reply_message_id,
                message=result.message,
                tool_calls=result.tool_calls,
                tool_outputs=result.tool_outputs,
                usage=result.usage,
            )
        else:
            status = "failed"
            error = RunErrorOut(
                code=stored_run.error_code or "run_failed",
                message=stored_run.error or "the run failed",
            )
    return MessageState(
        id=message.id,
        session_id=message.session_id,
        seq=message.seq,
        content=message.content,
        created_at=message.created_at,
        status=status,
        message_ids=message_ids,
        run=run,
        reply=reply,
        error=error,
    )


def _delivery_out(delivery: Delivery) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id,
        run_id=delivery.run_id,
        session_id=delivery.session_id,
        url=delivery.url,
        status=delivery.status,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_error=delivery.last_error,
        last_status_code=delivery.last_status_code,
        created_at=delivery.created_at,
        delivered_at=delivery.delivered_at,
        payload=json.loads(delivery.body),
    )


@router.get("/deliveries", response_model=DeliveryPage, responses=errors(422, 503))
async def list_deliveries(
    services: ServicesDep,
    caller: CallerDep,
    status: DeliveryStatus | None = None,
    page: Annotated[int, Query(ge=1, le=max_page(DELIVERIES_PER_PAGE))] = 1,
    page_size: Annotated[int, Query(ge=1, le=DELIVERIES_PER_PAGE)] = 50,
) -> DeliveryPage:
    """Webhook deliveries, newest first; ``status`` filters (``failed``: gave up). A user
    key lists the deliveries of its user's sessions only."""
    deliveries, total = await services.store.list_deliveries(
        status=status,
        owner=caller.user_id if caller.role == "user" else None,
        limit=page_size,
        offset=(page - 1) * page_size,
    )
    return DeliveryPage(
        deliveries=[_delivery_out(d) for d in deliveries],
        total=total,
        page=page,
        page_size=page_size,
    )


@router.post(
    "/deliveries/{delivery_id}/redeliver",
    response_model=DeliveryOut,
    responses=errors(404, 422, 503),
)
async def redeliver(delivery_id: UUID, services: ServicesDep, caller: CallerDep) -> DeliveryOut:
    """Send a delivery again, now, whatever its status, with a fresh WEBHOOK_MAX_AGE_S."""
    if caller.role == "user":
        found = await services.store.get_delivery(delivery_id)
        try:
            if found is not None:
                await _check_session(services.store, found.session_id, caller)
        except SessionNotFound:
            found = None
        if found is None:
            raise DeliveryNotFound(f"delivery {str(delivery_id)!r} not found")
    delivery = await services.store.redeliver(delivery_id)
    if delivery is None:
        raise DeliveryNotFound(f"delivery {str(delivery_id)!r} not found")
    if services.deliverer is not None:
        services.deliverer.wake()
    return _delivery_out(delivery)
