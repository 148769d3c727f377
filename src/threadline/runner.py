"""The turn runner: answers one ``Job`` of the queue with one agent run.

Steps, each with its failure mode:

1. open the run (skipped on the fast path, where the insert already did it). Nothing to open
   means another run answered the messages (``AnsweredElsewhere``) or the session is gone;
2. run the agent on the history window, the prompt being every message of the run joined by
   ``"\\n---\\n"``; bounded by ``MODEL_TIMEOUT_S``;
3. commit: one fenced write stores the reply and finishes the run. Once started it completes
   even if the queue or a shutdown cancels us, and its result is the callers' answer, so a
   caller is never told "shut down" about a reply that landed. A fenced-out commit means a
   newer run owns the session (``FencedOut``) or the session was deleted.

Every run ends in one status (docs/architecture.md, "Failure semantics"):

* ``succeeded``: committed.
* ``failed``: model error, timeout, tool exception, store error, or a bug. The tool calls it
  completed are kept in history, its messages are answered by failure (never prompted again,
  so a poison message cannot break the session's next one) and its callers get the error's
  stable code with a message safe to show a user; the details go to the log with session and
  run ids. When the store refuses to record the failure, the callers are answered at once and
  the runner retries the record until the store is back.
* ``superseded`` / ``cancelled``: the queue cancelled us (a merge, a shutdown); completed tool
  calls are kept and the messages stay unanswered for the next run.
* ``cancelled`` with ``run_cancelled``: a client cancelled us; completed tool calls are kept
  and the messages are answered by the cancel, like a failure.

As it goes, the run tells its watchers through an ``EventSink`` (``events.py``): started,
tool calls and results, the model's text as it streams (when a caller of one of its messages
streams: ``RunOptions.stream``), and how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic_ai import Agent
from pydantic_ai.direct import model_request, model_request_stream
from pydantic_ai.exceptions import AgentRunError, ModelAPIError, UnexpectedModelBehavior
from pydantic_ai.messages import (
    AgentInstructionSource,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    InstructionId,
    InstructionPart,
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.run import AgentRun
from pydantic_ai.settings import ModelSettings
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from threadline import logs, metrics
from threadline.agents import AgentRegistry, LoadedAgent, RunDeps
from threadline.delivery.payload import Event, webhook_deliveries, webhook_urls
from threadline.errors import (
    AgentNotFound,
    AgentUnavailable,
    AnsweredElsewhere,
    FencedOut,
    ModelError,
    ModelTimeout,
    RunCancelled,
    RunFailed,
    SessionNotFound,
    StoreUnavailable,
    ThreadlineError,
    ToolError,
)
from threadline.events import EventSink, Kind, NoEvents, RunEvent
from threadline.queue.job import Job, Outcome, TurnResult
from threadline.store import (
    RUN_CANCELLED,
    Message,
    NewDelivery,
    NewMessage,
    Reply,
    Run,
    RunError,
    RunStart,
    Store,
    Turn,
)
from threadline.store.base import EndStatus, closes_messages

if TYPE_CHECKING:
    from threadline.tracing import RunSpan, Tracing

log = logging.getLogger(__name__)

PROMPT_SEPARATOR = "\n---\n"


def turn_result(
    text: str, reply_id: UUID, messages: list[ModelMessage], usage: dict[str, Any]
) -> TurnResult:
    """The caller-facing result of a reply, from the model messages the run produced."""
    calls, returns = _tool_parts(messages)
    return TurnResult(
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


def _side_effects(run_id: UUID, messages: list[ModelMessage], ending: str) -> list[NewMessage]:
    """The tool calls a run completed before it ended without a reply, as one tool row.

    ``messages`` must be the run's *own* messages: the history it was given holds earlier
    runs' tool calls, which are stored already.
    """
    calls, returns = _tool_parts(messages)
    done = {r.tool_call_id for r in returns}
    calls = [c for c in calls if c.tool_call_id in done]
    if not calls:
        return []
    returns = [r for r in returns if r.tool_call_id in {c.tool_call_id for c in calls}]
    saved: list[ModelMessage] = [ModelResponse(parts=calls), ModelRequest(parts=returns)]
    summary = "; ".join(f"{r.tool_name} -> {r.model_response_str()}" for r in returns)
    return [
        NewMessage(
            id=uuid.uuid4(),
            role="tool",
            content=f"tool calls completed before this run {ending}: {summary}",
            run_id=run_id,
            payload=ModelMessagesTypeAdapter.dump_json(saved),
        )
    ]


def _own_messages(
    agent_run: AgentRun[RunDeps, str] | None, answered: ModelResponse | None = None
) -> list[ModelMessage]:
    """What the run itself produced: without the history it was given and without our prompt
    (the direct request's response, ``answered``, if the graph did not take over from it)."""
    if agent_run is not None:
        return agent_run.new_messages()[1:]
    return [answered] if answered is not None else []


class _Replay(WrapperModel):
    """The agent's model, whose first request is answered by a response already received: the
    graph takes a run over from its direct request (``LoadedAgent.direct``) as if it had made
    that request itself, so that what follows (the tools run, a retry prompt, the retries
    counted, the messages, the usage) is the graph's own.

    Not an ``InstrumentedModel`` itself, even for a traced agent: pydantic-ai calls such a
    model's wrapped model directly, which would skip the replay and ask the provider again. So
    a traced run shows the replayed request twice: the direct request's span under the run,
    and the graph's (answered at once) under ``invoke_agent``."""

    def __init__(self, wrapped: Model, first: ModelResponse) -> None:
        super().__init__(wrapped)
        self.first: ModelResponse | None = first

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        first, self.first = self.first, None
        if first is not None:
            return first
        return await super().request(messages, model_settings, model_request_parameters)


def until_the_store_answers(*also: type[Exception]) -> AsyncRetrying:
    """Retry a step the store (or one of ``also``) refused until it succeeds or the task is
    cancelled (a shutdown), at most every 5 s: for work whose callers were answered already."""
    return AsyncRetrying(
        retry=retry_if_exception_type((StoreUnavailable, *also)),
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        reraise=True,
    )


def _ending(job: Job, outcome: Outcome | None) -> str:
    """The run's outcome label (``threadline_runs_finished_total``); ``outcome`` is None when
    the run was cancelled."""
    if outcome is None:
        reason = job.cancel_reason
        return reason if reason in ("superseded", "cancelled") else "shutdown"
    if outcome.error is None:
        return "succeeded"
    if isinstance(outcome.error, AnsweredElsewhere | FencedOut | SessionNotFound):
        return "handed_off"
    return "failed"


class _ModelCalls:
    """Times a run's model requests. pydantic-ai makes a request while running the
    ``ModelRequestNode`` the run's iterator has just yielded: between yielding it and yielding
    the next node (or inside its ``stream``, which runs before the next node comes)."""

    def __init__(self, agent: str, model: str) -> None:
        self._labels = (agent, model)
        self._since: float | None = None

    def begin(self) -> None:
        self._since = time.perf_counter()

    def end(self) -> None:
        if self._since is not None:
            elapsed = time.perf_counter() - self._since
            metrics.MODEL_CALL_DURATION.labels(*self._labels).observe(elapsed)
            self._since = None

    def failed(self, kind: str, *, in_flight_only: bool = True) -> None:
        """Count an error; ``in_flight_only``: only if it ended a request (a timeout may as
        well end a tool call, which is no model error)."""
        if self._since is not None or not in_flight_only:
            metrics.MODEL_CALL_ERRORS.labels(*self._labels, kind).inc()
        self._since = None


def _instructions(
    own: str, caller: str | None, parameters: ModelRequestParameters
) -> tuple[str | None, ModelRequestParameters]:
    """The agent's instructions and its caller's as the agent's graph sends them: joined on
    the request, and as parts (the agent's own, then the run's) that a provider may send apart
    (OpenAI's chat API: one system message each), on the agent's first-request ``parameters``
    (its tools: ``LoadedAgent.parameters``)."""
    parts = []
    if own:
        parts.append(InstructionPart(own, id=InstructionId(AgentInstructionSource())))
    if caller:
        parts.append(InstructionPart(caller))
    joined = "\n\n".join(part.content for part in parts) or None
    return joined, replace(parameters, instruction_parts=parts or None)


def _text_delta(event: object) -> str:
    """The model's text an event of its stream carries, or ""."""
    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return event.part.content
    if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
        return event.delta.content_delta
    return ""


def _plain_history(history: Sequence[ModelMessage]) -> bool:
    """Whether the graph would send ``history`` as it is: text turns only (a user prompt, then
    a text reply), none following one of its own kind. Anything else (tool traffic, retries,
    two prompts in a row after a failed run) the graph repairs, merges or reorders before it
    sends it (``pydantic_ai.messages.repair_messages``, the model's ``prepare_messages``), so
    such a run takes the graph from its first request."""
    kind = "response"
    for message in history:
        if message.kind == kind:
            return False
        kind = message.kind
        plain = UserPromptPart if isinstance(message, ModelRequest) else TextPart
        if not all(isinstance(part, plain) for part in message.parts):
            return False
    return kind == "response"


def _direct_answer(
    response: ModelResponse,
) -> tuple[str, list[ModelMessage], dict[str, Any]] | None:
    """The run's reply, new messages and usage when a direct request's response ends it as
    the graph would end it: complete, with text, and nothing but text and thinking (no tool
    call, no provider-side tool, no failed attempt of a fallback model to count). None
    otherwise: the graph takes the turn over (runs the tools, asks again, ...)."""
    if response.state != "complete" or response.failed_attempts:
        return None
    if not all(isinstance(p, TextPart | ThinkingPart) for p in response.parts):
        return None
    output = "".join(p.content for p in response.parts if isinstance(p, TextPart))
    if not output:
        return None
    usage = {
        "input_tokens": response.usage.input_tokens,
        "output_tokens": response.usage.output_tokens,
        "requests": 1,
        "tool_calls": 0,
    }
    return output, [response], usage


def _streams(turn: Turn) -> bool:
    """Whether a caller of one of the run's messages streams (``RunOptions.stream``)."""
    return any(m.options is not None and m.options.get("stream") for m in turn.prompt)


class TurnRunner:
    def __init__(
        self,
        store: Store,
        registry: AgentRegistry,
        *,
        model_timeout_s: float,
        events: EventSink | None = None,
        on_delivery: Callable[[], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._store = store
        # None: not traced, and nothing of OpenTelemetry is imported (``tracing.py``).
        self._tracing = tracing
        self._registry = registry
        self._timeout = model_timeout_s
        self._events = events if events is not None else NoEvents()
        # Told when a run's ending wrote webhook deliveries, so this process sends them now
        # rather than at its sender's next poll.
        self._on_delivery = on_delivery

    def _emit(self, job: Job, kind: Kind, **data: Any) -> None:
        self._events.emit(RunEvent(kind, job.session_id, job.run_id, data))

    async def _drive(
        self,
        job: Job,
        agent_run: AgentRun[RunDeps, str],
        stream: bool,
        calls: _ModelCalls,
        replayed: bool = False,
    ) -> None:
        """Run the agent's graph to its end, telling watchers what happens: the model's text
        as the provider streams it (``stream``), tool calls and their results. ``replayed``:
        the first model request is answered by ``_Replay``, already timed and streamed."""
        async for node in agent_run:
            calls.end()
            if Agent.is_model_request_node(node):
                if replayed:
                    replayed = False
                    continue
                calls.begin()
                if stream:
                    async with node.stream(agent_run.ctx) as events:
                        async for event in events:
                            delta = _text_delta(event)
                            if delta:
                                self._emit(job, "text.delta", delta=delta)
            elif Agent.is_call_tools_node(node) and any(
                isinstance(part, ToolCallPart) for part in node.model_response.parts
            ):
                # Only a response that calls tools has tool events: a plain reply skips the
                # stream's machinery (measured: ~0.2 ms of CPU per turn).
                async with node.stream(agent_run.ctx) as events:
                    async for event in events:
                        if isinstance(event, FunctionToolCallEvent):
                            call = event.part
                            self._emit(
                                job,
                                "tool.call",
                                tool_name=call.tool_name,
                                args=call.args_as_dict(),
                                tool_call_id=call.tool_call_id,
                            )
                        elif isinstance(event, FunctionToolResultEvent):
                            part = event.part
                            self._emit(
                                job,
                                "tool.result",
                                tool_name=part.tool_name,
                                content=part.model_response_str(),
                                tool_call_id=part.tool_call_id,
                            )
        calls.end()

    async def _request(
        self,
        job: Job,
        loaded: LoadedAgent,
        prompt: str,
        history: list[ModelMessage],
        instructions: str | None,
        stream: bool,
        calls: _ModelCalls,
    ) -> ModelResponse:
        """A direct agent's (``LoadedAgent.direct``) first model request, sent as
        its graph would send it, without the graph's machinery. ``_direct_answer`` says
        whether its response is the whole run.
        tests/agents/test_direct.py holds both paths to the same requests, history, usage,
        deltas and errors."""
        assert loaded.parameters is not None, "a direct agent's are read when it loads"
        joined, parameters = _instructions(
            loaded.spec.instructions, instructions, loaded.parameters
        )
        request = ModelRequest(parts=[UserPromptPart(prompt)], instructions=joined)
        messages: list[ModelMessage] = [*history, request]
        settings = loaded.spec.model_settings
        # Traced as the agent's model requests are (a span per request; ``tracing.py``).
        instrument = loaded.agent.instrument
        calls.begin()
        if stream:
            async with model_request_stream(
                loaded.model,
                messages,
                model_settings=settings,
                model_request_parameters=parameters,
                instrument=instrument,
            ) as streamed:
                async for event in streamed:
                    delta = _text_delta(event)
                    if delta:
                        self._emit(job, "text.delta", delta=delta)
            response = streamed.get()
        else:
            response = await model_request(
                loaded.model,
                messages,
                model_settings=settings,
                model_request_parameters=parameters,
                instrument=instrument,
            )
        calls.end()
        # Stamped as the graph stamps its responses (seen in a stored tool-call payload).
        response.model_id = response.model_id or loaded.model.model_id
        return response

    async def __call__(self, job: Job) -> Outcome:
        """Run ``job`` (``_run``), counting and logging how it started and ended."""
        job.started = True
        options = job.options
        assert options is not None, "every job carries its callers' run options"
        agent = options.agent
        # This task's own log context: it was spawned by the request that sent the first
        # message, but it answers every message of the run.
        logs.scope(session_id=job.session_id, run_id=job.run_id)
        metrics.RUNS_STARTED.labels(agent).inc()
        log.info("run started", extra={"agent": agent, "event": "run.started"})
        began = time.perf_counter()
        outcome: Outcome | None = None
        ending: str | None = None
        try:
            outcome = await self._traced(job)
            return outcome
        except asyncio.CancelledError:
            raise
        except BaseException:
            ending = "failed"  # a bug: the queue answers the callers with run_failed
            raise
        finally:
            ending = ending or _ending(job, outcome)
            answered = len(outcome.message_ids) if outcome is not None else 0
            metrics.RUNS_FINISHED.labels(agent, ending).inc()
            if ending in ("succeeded", "failed") and answered:
                metrics.MESSAGES_ANSWERED.labels(agent, ending).inc(answered)
            if ending == "succeeded":
                metrics.RUN_MESSAGES.labels(agent).observe(answered)
            elapsed_ms = round((time.perf_counter() - began) * 1000, 2)
            log.info(
                "run %s in %.1fms, messages answered: %d",
                ending,
                elapsed_ms,
                answered,
                extra={
                    "agent": agent,
                    "event": f"run.{ending}",
                    "outcome": ending,
                    "latency_ms": elapsed_ms,
                    "messages": answered,
                },
            )

    async def _traced(self, job: Job) -> Outcome:
        if self._tracing is None:
            return await self._run(job)
        with self._tracing.running(job) as span:
            outcome = await self._run(job, span)
            span.ended(outcome)
            return outcome

    async def _run(self, job: Job, span: RunSpan | None = None) -> Outcome:
        options = job.options
        assert options is not None
        agent_run: AgentRun[RunDeps, str] | None = None
        # The direct request's response, once it came (``LoadedAgent.direct``).
        carried: ModelResponse | None = None
        turn: Turn | None = job.prepared
        model_calls: _ModelCalls | None = None
        error: ThreadlineError
        try:
            if job.cancel_reason is not None:
                raise asyncio.CancelledError
            loaded = await self._registry.get(options.agent)
            model_calls = _ModelCalls(options.agent, loaded.model_name)
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
                error = await self._gone_or(
                    job, AnsweredElsewhere("these messages were answered by another run")
                )
                return Outcome(job.run_id, (), error=error)
            job.opened = True
            if span is not None:
                span.opened(turn)
            self._emit(
                job,
                "run.started",
                session_id=str(job.session_id),
                message_ids=[str(m) for m in turn.run.message_ids],
            )
            prompt = PROMPT_SEPARATOR.join(m.content for m in turn.prompt)
            deps = RunDeps(job.session_id, job.run_id, options.user_id, options.context)
            history = to_model_messages(turn.history)
            answered: tuple[str, list[ModelMessage], dict[str, Any]] | None = None
            async with asyncio.timeout(self._timeout):
                if loaded.direct and _plain_history(history):
                    carried = await self._request(
                        job,
                        loaded,
                        prompt,
                        history,
                        options.instructions,
                        _streams(turn),
                        model_calls,
                    )
                    answered = _direct_answer(carried)
                if answered is None:
                    # Not a direct agent, or a reply the run does not end on (a tool call, no
                    # text): the graph runs the turn from the start, its first request
                    # answered by the direct request's reply if there was one (``_Replay``),
                    # so the rest (tools run, a retry prompt, ...) is its own.
                    model = None if carried is None else _Replay(loaded.model, carried)
                    agent: Agent[RunDeps, str] = loaded.agent
                    async with agent.iter(
                        prompt,
                        message_history=history,
                        deps=deps,
                        # The newest answered message's caller's, appended to the agent's own.
                        instructions=options.instructions,
                        model=model,
                    ) as agent_run:
                        await self._drive(
                            job, agent_run, _streams(turn), model_calls, model is not None
                        )
            if answered is not None:
                output, new, usage = answered
            else:
                assert agent_run is not None
                result = agent_run.result
                assert result is not None
                output = result.output
                new = _own_messages(agent_run)
                usage = {
                    "input_tokens": result.usage.input_tokens,
                    "output_tokens": result.usage.output_tokens,
                    "requests": result.usage.requests,
                    "tool_calls": result.usage.tool_calls,
                }
            calls, _ = _tool_parts(new)
            reply = NewMessage(
                id=uuid.uuid4(),
                role="assistant",
                content=output,
                run_id=job.run_id,
                # Plain text replies rebuild from ``content``; only tool traffic needs the payload.
                payload=ModelMessagesTypeAdapter.dump_json(new) if calls else None,
            )
            done = turn_result(output, reply.id, new, usage)
            owed = self._deliveries(job, turn, turn.run.message_ids, "run.succeeded", done)
            job.committing = True
            stored = await self._commit(job, Reply(reply, usage, tuple(owed)))
            if stored is None:
                error = await self._gone_or(job, FencedOut("a newer run took this session over"))
                self._failed(job, (), error.code, str(error))
                return Outcome(job.run_id, (), error=error)
            self._delivered(owed)
            self._emit(
                job,
                "run.completed",
                session_id=str(job.session_id),
                message_ids=[str(m) for m in turn.run.message_ids],
                message=done.message,
                reply_message_id=str(done.reply_message_id),
                tool_calls=done.tool_calls,
                tool_outputs=done.tool_outputs,
                usage=done.usage,
            )
            return Outcome(job.run_id, turn.run.message_ids, done)
        except asyncio.CancelledError:
            if not job.committing:
                await self._record_cancel(job, turn, _own_messages(agent_run, carried))
            raise
        except TimeoutError:
            if model_calls is not None:
                model_calls.failed("timeout")
            error = ModelTimeout(f"the model did not answer within {self._timeout:g}s", job.run_id)
            log.warning("run %s of session %s: %s", job.run_id, job.session_id, error)
            return await self._fail(job, turn, error, _own_messages(agent_run, carried))
        except ToolError as exc:
            log.error(
                "run %s of session %s: tool %r raised",
                job.run_id,
                job.session_id,
                exc.tool,
                exc_info=exc.__cause__ or exc,
            )
            return await self._fail(job, turn, exc, _own_messages(agent_run, carried))
        except (ModelAPIError, UnexpectedModelBehavior, AgentRunError) as exc:
            if model_calls is not None:
                kind = "provider" if isinstance(exc, ModelAPIError) else "unexpected"
                model_calls.failed(kind, in_flight_only=False)
            log.warning("run %s of session %s: model failed: %r", job.run_id, job.session_id, exc)
            error = ModelError("the model provider failed to answer", job.run_id)
            return await self._fail(job, turn, error, _own_messages(agent_run, carried))
        except SessionNotFound as exc:
            return Outcome(job.run_id, (), error=exc)
        except (AgentNotFound, AgentUnavailable) as exc:
            # Its messages name an agent this process does not serve (removed from the
            # config before a restart answered them, or not deployed here yet) or cannot set
            # up now: the run fails with that agent's own code, not as a bug of ours.
            log.warning("run %s of session %s: %s", job.run_id, job.session_id, exc)
            return await self._fail(job, turn, exc, _own_messages(agent_run, carried))
        except StoreUnavailable as exc:
            log.warning("run %s of session %s: %s", job.run_id, job.session_id, exc)
            error = StoreUnavailable("the database is unavailable; retry later")
            return await self._fail(job, turn, error, _own_messages(agent_run, carried))
        except Exception:
            if model_calls is not None:
                model_calls.failed("other")
            log.exception("run %s of session %s failed", job.run_id, job.session_id)
            error = RunFailed("the run failed unexpectedly", job.run_id)
            return await self._fail(job, turn, error, _own_messages(agent_run, carried))

    async def _commit(self, job: Job, reply: Reply) -> Message | None:
        commit = asyncio.ensure_future(self._store.commit_run(job.session_id, job.run_id, reply))
        cancelled = 0
        while True:
            try:
                stored = await asyncio.shield(commit)
            except asyncio.CancelledError:
                if commit.done() and commit.cancelled():
                    raise
                # A shutdown reached us inside the commit. The write goes on regardless and
                # its result is what the callers are owed: wait for it, then finish normally.
                cancelled += 1
                continue
            break
        task = asyncio.current_task()
        for _ in range(cancelled):
            if task is not None:
                task.uncancel()
        return stored

    async def _gone_or(self, job: Job, handoff: ThreadlineError) -> ThreadlineError:
        """Nothing to open or commit: the session was deleted, or another run answers."""
        if await self._store.get_session(job.session_id) is None:
            return SessionNotFound(
                f"session {str(job.session_id)!r} was deleted while its messages were answered"
            )
        return handoff

    async def _record_cancel(self, job: Job, turn: Turn | None, done: list[ModelMessage]) -> None:
        reason = job.cancel_reason
        superseded = reason == "superseded"
        ending = "was superseded" if superseded else "was cancelled"
        status: EndStatus = "superseded" if superseded else "cancelled"
        error = None
        if reason == "cancelled":
            error = RunError(RUN_CANCELLED, str(RunCancelled("the run was cancelled")))
        elif not superseded:
            error = RunError("shutting_down", "the server shut down mid-run")
        run: Run | None = None
        try:
            # Shielded: the run row and its side effects must be written even though this task
            # is being cancelled.
            run = await asyncio.shield(
                self._finish_cancelled(job, turn, status, error, done, ending)
            )
        except StoreUnavailable as exc:
            # The run stays open in the store until the session's next run fences it out and
            # closes it; its messages are unanswered, so that run answers them.
            log.warning("run %s: could not record its end: %s", job.run_id, exc)
        if superseded:
            self._emit(job, "run.superseded", superseded_by=str(job.superseded_by))
        else:
            assert error is not None
            # A client's cancel closed the run's messages (if the store recorded it); a
            # shutdown's leaves them to the next run: no message ids.
            closed = run.message_ids if run is not None and reason == "cancelled" else ()
            self._failed(job, closed, error.code, error.message)

    async def _finish_cancelled(
        self,
        job: Job,
        turn: Turn | None,
        status: EndStatus,
        error: RunError | None,
        done: list[ModelMessage],
        ending: str,
    ) -> Run | None:
        owed: list[NewDelivery] = []
        if closes_messages(status, error):
            # A cancel that answers the messages is delivered like a failure; one that leaves
            # them for the next run (superseded, shutdown) is not: that run delivers.
            ids = await self._message_ids(job, turn)
            owed = self._deliveries(job, turn, ids, "run.cancelled", error=error)
        run = await self._store.finish_run(
            job.session_id,
            job.run_id,
            status,
            error=error,
            superseded_by=job.superseded_by,
            side_effects=_side_effects(job.run_id, done, ending),
            deliveries=owed,
        )
        if run is not None:
            self._delivered(owed)
        return run

    async def _message_ids(self, job: Job, turn: Turn | None) -> tuple[UUID, ...]:
        if turn is not None:
            return turn.run.message_ids
        run = await self._store.get_run(job.run_id)
        return run.message_ids if run is not None else ()

    def _deliveries(
        self,
        job: Job,
        turn: Turn | None,
        message_ids: Sequence[UUID],
        event: Event,
        result: TurnResult | None = None,
        error: RunError | None = None,
    ) -> list[NewDelivery]:
        """The webhook deliveries this run's ending owes (delivery/payload.py)."""
        options = job.options
        assert options is not None
        try:
            default = self._registry.spec(options.agent).webhook_url
        except AgentNotFound:
            default = None  # an agent removed from the configuration: request URLs only
        urls = webhook_urls(turn.prompt if turn is not None else (), options, default)
        if not urls:
            return []
        return webhook_deliveries(
            urls,
            event,
            session_id=job.session_id,
            run_id=job.run_id,
            agent=options.agent,
            message_ids=message_ids,
            result=result,
            error=error,
        )

    def _delivered(self, owed: Sequence[NewDelivery]) -> None:
        if owed and self._on_delivery is not None:
            self._on_delivery()

    def _failed(self, job: Job, closed: tuple[UUID, ...], code: str, message: str) -> None:
        self._emit(
            job,
            "run.failed",
            session_id=str(job.session_id),
            message_ids=[str(m) for m in closed],
            error={"code": code, "message": message},
        )

    async def _fail(
        self,
        job: Job,
        turn: Turn | None,
        error: ThreadlineError,
        done: list[ModelMessage],
    ) -> Outcome:
        """End the run as ``failed`` after it produced ``done``; each caller of ``_fail`` has
        logged why."""
        side = _side_effects(job.run_id, done, "failed")
        record = RunError(error.code, str(error))
        try:
            run = await asyncio.shield(self._record_failure(job, turn, record, side))
        except StoreUnavailable:
            # Answer the callers now; record the failure once the store is back, so the
            # messages end answered (by failure) rather than waiting for the session's next
            # message. The queue starts nothing else of this session meanwhile.
            assert job.settle is not None
            job.settle(Outcome(job.run_id, (), error=error))
            async for attempt in until_the_store_answers():
                with attempt:
                    run = await self._record_failure(job, turn, record, side)
        if run is None:
            # Another run fenced this one out before it could fail: that run answers.
            fenced = FencedOut("a newer run took this session over")
            self._failed(job, (), fenced.code, str(fenced))
            return Outcome(job.run_id, (), error=await self._gone_or(job, fenced))
        self._failed(job, run.message_ids, error.code, str(error))
        return Outcome(job.run_id, run.message_ids, error=error)

    async def _record_failure(
        self, job: Job, turn: Turn | None, error: RunError, side: list[NewMessage]
    ) -> Run | None:
        if turn is None and await self._store.get_run(job.run_id) is None:
            # The failure came before the run was open: open it, so the failure is recorded
            # against the messages it was to answer.
            options = job.options
            assert options is not None
            start = RunStart(job.run_id, options.agent, None, 0, job.upto_seq)
            with contextlib.suppress(SessionNotFound):
                turn = await self._store.start_run(job.session_id, start)
            if turn is None:
                return None
        ids = await self._message_ids(job, turn)
        owed = self._deliveries(job, turn, ids, "run.failed", error=error)
        run = await self._store.finish_run(
            job.session_id, job.run_id, "failed", error=error, side_effects=side, deliveries=owed
        )
        if run is not None:
            self._delivered(owed)
        return run
