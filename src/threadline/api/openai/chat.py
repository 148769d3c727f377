"""``/v1/models`` and ``/v1/chat/completions``, in OpenAI's formats.

``model`` is an agent's name. The request's last user message goes through the queue like any
other (``conversation.py`` says which session it continues); a message merged into a run that
answers several is answered with that run's reply, and the response's ``metadata`` lists the
messages it answered. Streamed (``stream``), the reply comes as OpenAI's
``chat.completion.chunk`` events and ``data: [DONE]``; a run superseded mid-stream is told by a
chunk with a ``threadline`` note (``{"event": "run.superseded"}``) before the merged run's text,
since OpenAI's format cannot take text back.

Fields a request may carry: ``model``, ``messages``, ``stream``, ``stream_options``, ``user``,
``metadata``, ``store``. Any other is a 400 naming it: the agent's own settings, tools and
output type apply, and a server that silently ignored ``temperature`` or ``tools`` would answer
something other than what was asked.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sse_starlette import EventSourceResponse, ServerSentEvent

from threadline.api.access import Caller
from threadline.api.contract import openai_errors
from threadline.api.deps import CallerDep, Services, ServicesDep
from threadline.api.errors import PayloadTooLarge, openai_error_body
from threadline.api.jsonbody import json_body
from threadline.api.openai.conversation import ContentPart, Turn, find_session, note, seed
from threadline.api.streams import TurnStream
from threadline.api.validation import StorableText
from threadline.coordination import TurnRequest
from threadline.errors import BadParameter, UnsupportedParameter
from threadline.events import RunEvent
from threadline.queue.job import Answer
from threadline.store import Role

router = APIRouter()

# When the agents were "created", for /v1/models: the server has no such date.
CREATED = 0


class ChatMessage(BaseModel):
    # Earlier messages may carry what OpenAI's clients keep (tool_calls, name...): the
    # server's history is the truth for a session that has one, so they are not used.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StorableText | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # A field not declared here is refused (400 ``unsupported_parameter`` naming it).
    model_config = ConfigDict(extra="forbid")

    model: StorableText
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StorableText | None = Field(default=None, max_length=200)
    metadata: dict[StorableText, StorableText] | None = None
    # OpenAI's "store the completion": threadline stores every conversation anyway.
    store: StrictBool | None = None


def text_of(message: ChatMessage, where: str) -> str:
    """A message's text; parts other than text are refused, naming the part."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for i, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise UnsupportedParameter(
                f"{where}.content[{i}].type", f": only text parts are ({part.type!r} given)"
            )
        texts.append(part.text)
    return "".join(texts)


def conversation(messages: list[ChatMessage]) -> Turn:
    """The new user message and the user/assistant history before it; system and developer
    messages give way to the agent's own instructions, tool messages to its own tools."""
    last = messages[-1]
    if last.role != "user":
        raise BadParameter("the last message must be a user message", "messages")
    content = text_of(last, f"messages[{len(messages) - 1}]")
    if not content.strip():
        raise BadParameter("the last user message is empty", "messages")
    earlier: list[tuple[Role, str]] = []
    for i, message in enumerate(messages[:-1]):
        if message.role in ("user", "assistant"):
            earlier.append((message.role, text_of(message, f"messages[{i}]")))
    return Turn(earlier, content)


def usage(answer: Answer) -> dict[str, int]:
    raw = answer.outcome.result.usage if answer.outcome.result is not None else {}
    prompt, completion = raw.get("input_tokens") or 0, raw.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def metadata(answer: Answer, session_id: UUID) -> dict[str, str]:
    outcome = answer.outcome
    return note(session_id, answer.message_id, outcome.run_id, outcome.message_ids)


@router.get("/models", responses=openai_errors(503))
async def list_models(services: ServicesDep) -> dict[str, Any]:
    """The agents, as OpenAI lists models."""
    return {
        "object": "list",
        "data": [
            {"id": spec.name, "object": "model", "created": CREATED, "owned_by": "threadline"}
            for spec in services.registry.specs
        ],
    }


@router.get("/models/{model}", responses=openai_errors(404, 503))
async def get_model(model: str, services: ServicesDep) -> dict[str, Any]:
    await services.registry.get(model)  # 404 agent_not_found
    return {"id": model, "object": "model", "created": CREATED, "owned_by": "threadline"}


async def turn_request(
    services: Services,
    agent: str,
    turn: Turn,
    named: str | None,
    user: str | None,
    stream: bool,
    caller: Caller,
) -> TurnRequest:
    """Check the request against the agent and the limits, find (or start) its session."""
    settings, store = services.settings, services.store
    user = caller.user_for(user, "user")
    await services.registry.get(agent)  # 404 before anything is stored
    if len(turn.content) > settings.max_message_chars:
        raise PayloadTooLarge(
            f"the last user message has {len(turn.content)} characters; "
            f"the limit is {settings.max_message_chars}"
        )
    session = await find_session(store, agent, named, user, caller)
    await seed(store, session, turn)
    return TurnRequest(
        session_id=session.id,
        agent=agent,
        content=turn.content,
        strategy=settings.queue_strategy,
        user_id=user if user is not None else session.user_id,
        history_limit=settings.history_limit,
        stream=stream,
    )


@router.post(
    "/chat/completions",
    response_model=None,
    responses=openai_errors(400, 404, 409, 413, 429, 502, 503, 504),
)
async def chat_completions(
    body: ChatCompletionRequest,
    services: ServicesDep,
    caller: CallerDep,
    x_session_id: Annotated[StorableText | None, Header()] = None,
) -> JSONResponse | EventSourceResponse:
    named = x_session_id or (body.metadata or {}).get("session_id")
    request = await turn_request(
        services, body.model, conversation(body.messages), named, body.user, body.stream, caller
    )
    headers = {"X-Session-Id": str(request.session_id)}
    if body.stream:
        stream = TurnStream(services.coordinator, request)
        await stream.start()
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(stream, body.model, include_usage)
        heartbeat = services.settings.stream_heartbeat_s
        return EventSourceResponse(chunks, ping=heartbeat, headers=headers)
    answer = await services.coordinator.submit(request)
    if answer.outcome.error is not None:
        raise answer.outcome.error
    result = answer.outcome.result
    assert result is not None
    completion = {
        "id": f"chatcmpl-{answer.message_id.hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.message, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage(answer),
        "metadata": metadata(answer, request.session_id),
    }
    return json_body(services.settings.json_encoder, completion, headers=headers)


def _chunk(
    completion_id: str, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _data(body: dict[str, Any] | str) -> ServerSentEvent:
    return ServerSentEvent(data=body if isinstance(body, str) else json.dumps(body))


async def _chunks(
    stream: TurnStream, model: str, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """The answer as OpenAI's chunk stream: role, text deltas, the finish, usage, [DONE]."""
    assert stream.message_id is not None
    completion_id = f"chatcmpl-{stream.message_id.hex}"
    yield _data(_chunk(completion_id, model, {"role": "assistant", "content": ""}))
    async for item in stream.follow():
        if isinstance(item, RunEvent):
            if item.kind == "text.delta":
                yield _data(_chunk(completion_id, model, {"content": item.data["delta"]}))
            elif item.kind == "run.superseded":
                note = _chunk(completion_id, model, {})
                note["threadline"] = {"event": "run.superseded", **item.data}
                yield _data(note)
        elif isinstance(item, Answer):
            if item.outcome.error is not None:
                # OpenAI's clients raise on an event that carries an error.
                yield _data({"error": openai_error_body(item.outcome.error)})
                return
            final = _chunk(completion_id, model, {}, "stop")
            final["metadata"] = metadata(item, stream.session_id)
            yield _data(final)
            if include_usage:
                tail = _chunk(completion_id, model, {})
                tail["choices"], tail["usage"] = [], usage(item)
                yield _data(tail)
            yield _data("[DONE]")
        else:
            yield _data({"error": openai_error_body(item)})
            return
