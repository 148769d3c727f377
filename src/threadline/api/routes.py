"""Routes under /api/v1: validate, call, map. Nothing else."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Response

from threadline.api.contract import errors
from threadline.api.deps import ServicesDep, require_api_key
from threadline.api.errors import PayloadTooLarge
from threadline.api.idempotency import (
    REPLAYED_HEADER,
    REPLAYED_RESPONSE,
    IdempotencyKeyHeader,
    request_key,
)
from threadline.api.schemas import (
    AgentInfo,
    MessageOut,
    RunOut,
    RunRequest,
    RunResponse,
    SessionDetail,
    SessionOut,
    SessionPage,
)
from threadline.api.validation import StorableText, max_page
from threadline.coordination import TurnRequest
from threadline.errors import RunNotFound, SessionAgentMismatch, SessionNotFound
from threadline.store import Session, Store

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_api_key)])

# Largest page sizes; ``page`` is bounded so that the offset fits 64 bits (api/validation.py).
SESSIONS_PER_PAGE = 500
MESSAGES_PER_PAGE = 1000


async def _find_session(store: Store, id_or_name: str, user_id: str | None) -> Session:
    try:
        session = await store.get_session(UUID(id_or_name))
    except ValueError:
        session = await store.find_session(id_or_name, user_id)
    if session is None:
        raise SessionNotFound(f"session {id_or_name!r} not found")
    return session


@router.post(
    "/agent/{name}/run",
    response_model=RunResponse,
    responses={**errors(400, 404, 409, 413, 422, 429, 502, 503, 504), **REPLAYED_RESPONSE},
)
async def run_agent(
    name: Annotated[str, Path(examples=["echo"])],
    body: RunRequest,
    services: ServicesDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> RunResponse:
    settings, store = services.settings, services.store
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
    if body.session_id is not None:
        session = await store.get_session(body.session_id)
        if session is None:
            raise SessionNotFound(f"session {str(body.session_id)!r} not found")
    elif body.session_name is not None:
        session = await store.get_or_create_session(
            body.session_name, agent=name, user_id=body.user_id
        )
    else:
        session = await store.create_session(name, user_id=body.user_id)
    if session.agent != name:
        # Another agent's history is not this one's to extend (or to read back as context).
        raise SessionAgentMismatch(session.id, session.agent, name)
    answer = await services.coordinator.submit(
        TurnRequest(
            session_id=session.id,
            agent=name,
            content=body.message_content,
            strategy=body.strategy or settings.queue_strategy,
            user_id=body.user_id if body.user_id is not None else session.user_id,
            context=body.context,
            history_limit=(
                body.message_limit if body.message_limit is not None else settings.history_limit
            ),
            channel_payload=body.channel_payload,
            idempotency_key=key,
        )
    )
    if answer.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    outcome = answer.outcome
    if outcome.error is not None:
        raise outcome.error
    result = outcome.result
    assert result is not None, "an outcome without an error carries a reply"
    return RunResponse(
        message=result.message,
        session_id=session.id,
        run_id=outcome.run_id,
        message_ids=list(outcome.message_ids),
        message_id=answer.message_id,
        superseded=answer.superseded,
        tool_calls=result.tool_calls,
        tool_outputs=result.tool_outputs,
        usage=result.usage,
    )


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
    user_id: StorableText | None = None,
    page: Annotated[int, Query(ge=1, le=max_page(SESSIONS_PER_PAGE))] = 1,
    page_size: Annotated[int, Query(ge=1, le=SESSIONS_PER_PAGE)] = 50,
) -> SessionPage:
    """Sessions of ``user_id``; without it, only sessions that have no user."""
    sessions, total = await services.store.list_sessions(
        user_id=user_id, limit=page_size, offset=(page - 1) * page_size
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
    user_id: StorableText | None = None,
    page: Annotated[int, Query(ge=1, le=max_page(MESSAGES_PER_PAGE))] = 1,
    page_size: Annotated[int, Query(ge=1, le=MESSAGES_PER_PAGE)] = 100,
) -> SessionDetail:
    session = await _find_session(services.store, id_or_name, user_id)
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
    id_or_name: StorableText, services: ServicesDep, user_id: StorableText | None = None
) -> Response:
    session = await _find_session(services.store, id_or_name, user_id)
    await services.store.delete_session(session.id)
    return Response(status_code=204)


@router.get("/runs/{run_id}", response_model=RunOut, responses=errors(404, 422, 503))
async def get_run(run_id: UUID, services: ServicesDep) -> RunOut:
    run = await services.store.get_run(run_id)
    if run is None:
        raise RunNotFound(f"run {str(run_id)!r} not found")
    return RunOut.model_validate(run, from_attributes=True)
