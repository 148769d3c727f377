"""The turn runner: answers one ``Job`` of the queue with one agent run.

Steps, each with its failure mode:

1. open the run (skipped on the fast path, where the insert already did it);
2. run the agent on the history window, the prompt being every message of the run joined by
   ``"\\n---\\n"``; bounded by ``MODEL_TIMEOUT_S``;
3. commit: one fenced write stores the reply and finishes the run. Shielded: once started it
   completes even if the queue or a shutdown cancels us, so a caller is never unsure whether
   its reply landed.

A cancel from the queue (superseded, shutdown) aborts the model call (pydantic-ai closes the
provider request) and saves the tool calls the run already executed, so the next run's model
knows what was done. Model errors and timeouts finish the run as ``failed`` and come back as
an ``Outcome`` with an error for every caller; the messages stay unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from pydantic_ai import Agent
from pydantic_ai.exceptions import AgentRunError, ModelAPIError, UnexpectedModelBehavior
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.run import AgentRun

from threadline.agents import AgentRegistry, RunDeps
from threadline.errors import Fenced, ModelError, ModelTimeout, RunFailed
from threadline.queue.core import Job, Outcome
from threadline.store import Message, NewMessage, Reply, RunStart, Store

log = logging.getLogger(__name__)

PROMPT_SEPARATOR = "\n---\n"


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What the newest caller of a run asked for; travels through the queue as ``Job.options``."""

    agent: str
    user_id: str | None
    history_limit: int
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TurnResult:
    """A committed reply, as every caller of the run receives it."""

    message: str
    reply_message_id: UUID
    tool_calls: list[dict[str, Any]]
    tool_outputs: list[dict[str, Any]]
    usage: dict[str, Any]

    @classmethod
    def build(
        cls, text: str, reply_id: UUID, messages: list[ModelMessage], usage: dict[str, Any]
    ) -> TurnResult:
        """The caller-facing result of a reply, from the model messages the run produced."""
        calls, returns = _tool_parts(messages)
        return cls(
            text,
            reply_id,
            [
                {"tool_name": c.tool_name, "args": c.args_as_dict(), "tool_call_id": c.tool_call_id}
                for c in calls
            ],
            [
                {
                    "tool_name": r.tool_name,
                    "content": r.model_response_str(),
                    "tool_call_id": r.tool_call_id,
                }
                for r in returns
            ],
            usage,
        )


def to_model_messages(rows: list[Message]) -> list[ModelMessage]:
    """Rebuild pydantic-ai history from stored rows (user text, replies, saved tool rows)."""
    history: list[ModelMessage] = []
    for row in rows:
        if row.payload is not None:
            history.extend(ModelMessagesTypeAdapter.validate_json(row.payload))
        elif row.role == "user":
            history.append(ModelRequest(parts=[UserPromptPart(row.content)]))
        else:
            history.append(ModelResponse(parts=[TextPart(row.content)]))
    return history


def _tool_parts(messages: list[ModelMessage]) -> tuple[list[ToolCallPart], list[ToolReturnPart]]:
    calls = [p for m in messages for p in m.parts if isinstance(p, ToolCallPart)]
    returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    return calls, returns


def _side_effects(run_id: UUID, messages: list[ModelMessage]) -> list[NewMessage]:
    """The tool calls a cancelled run completed, as one tool row for the next run's history."""
    calls, returns = _tool_parts(messages)
    done = {r.tool_call_id for r in returns}
    calls = [c for c in calls if c.tool_call_id in done]
    if not calls:
        return []
    saved: list[ModelMessage] = [ModelResponse(parts=calls), ModelRequest(parts=returns)]
    summary = "; ".join(f"{r.tool_name} -> {r.model_response_str()}" for r in returns)
    return [
        NewMessage(
            id=uuid.uuid4(),
            role="tool",
            content=f"tool calls completed before this run was superseded: {summary}",
            run_id=run_id,
            payload=ModelMessagesTypeAdapter.dump_json(saved),
        )
    ]


class TurnRunner:
    def __init__(self, store: Store, registry: AgentRegistry, *, model_timeout_s: float) -> None:
        self._store = store
        self._registry = registry
        self._timeout = model_timeout_s

    async def __call__(self, job: Job) -> Outcome:
        job.started = True
        options: RunOptions = job.options
        agent_run: AgentRun[RunDeps, str] | None = None
        try:
            if job.cancel_reason is not None:
                raise asyncio.CancelledError
            loaded = await self._registry.get(options.agent)
            turn = job.prepared
            if turn is None:
                start = RunStart(
                    job.run_id,
                    options.agent,
                    loaded.model_name,
                    options.history_limit,
                    job.upto_seq,
                )
                job.opening = True
                turn = await self._store.start_run(job.session_id, start)
            if turn is None:
                error = Fenced("these messages were answered by another run", job.run_id)
                return Outcome(job.run_id, (), error=error)
            prompt = PROMPT_SEPARATOR.join(m.content for m in turn.prompt)
            deps = RunDeps(job.session_id, job.run_id, options.user_id, options.context)
            agent: Agent[RunDeps, str] = loaded.agent
            async with (
                asyncio.timeout(self._timeout),
                agent.iter(
                    prompt, message_history=to_model_messages(turn.history), deps=deps
                ) as agent_run,
            ):
                async for _ in agent_run:
                    pass
            result = agent_run.result
            assert result is not None
            new = result.new_messages()[1:]  # [0] is our own prompt, stored as user rows
            calls, _ = _tool_parts(new)
            text = result.output
            usage = {
                "input_tokens": result.usage.input_tokens,
                "output_tokens": result.usage.output_tokens,
                "requests": result.usage.requests,
                "tool_calls": result.usage.tool_calls,
            }
            reply = NewMessage(
                id=uuid.uuid4(),
                role="assistant",
                content=text,
                run_id=job.run_id,
                # Plain text replies rebuild from ``content``; only tool traffic needs the payload.
                payload=ModelMessagesTypeAdapter.dump_json(new) if calls else None,
            )
            job.committing = True
            stored = await asyncio.shield(
                self._store.commit_run(job.session_id, job.run_id, Reply(reply, usage))
            )
            if stored is None:
                error = Fenced("another runner took over this session", job.run_id)
                return Outcome(job.run_id, (), error=error)
            return Outcome(
                job.run_id, turn.run.message_ids, TurnResult.build(text, stored.id, new, usage)
            )
        except asyncio.CancelledError:
            if not job.committing:
                done = agent_run.all_messages()[1:] if agent_run is not None else []
                status: Literal["failed", "superseded"] = (
                    "superseded" if job.cancel_reason == "superseded" else "failed"
                )
                # Shielded: the run row and its side effects must be written even though
                # this task is being cancelled.
                await asyncio.shield(
                    self._store.finish_run(
                        job.session_id,
                        job.run_id,
                        status,
                        error=None if status == "superseded" else "cancelled: server shutdown",
                        superseded_by=job.superseded_by,
                        side_effects=_side_effects(job.run_id, done),
                    )
                )
            raise
        except TimeoutError:
            return await self._fail(
                job, ModelTimeout(f"model did not answer within {self._timeout:g}s", job.run_id)
            )
        except (ModelAPIError, UnexpectedModelBehavior, AgentRunError) as exc:
            return await self._fail(job, ModelError(f"model failed: {exc}", job.run_id))

    async def _fail(self, job: Job, error: RunFailed) -> Outcome:
        log.warning("run %s failed: %s", job.run_id, error)
        await asyncio.shield(
            self._store.finish_run(job.session_id, job.run_id, "failed", error=str(error))
        )
        return Outcome(job.run_id, (), error=error)
