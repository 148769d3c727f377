"""OpenTelemetry tracing: on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``THREADLINE_OTEL=1`` is set.

Imported only then (``create_app``), so a server without tracing loads none of this and pays
nothing per request: the runner and the coordinators hold ``None`` instead of a ``Tracing``.
Needs the ``otel`` extra (``pip install 'threadline[otel]'``).

One trace per request::

    POST /api/v1/agent/echo/run               FastAPI instrumentation (the server span)
    ├── INSERT INTO messages ...              asyncpg (and Redis commands, with Redis)
    ├── threadline.queue_wait                 message accepted -> start of the run answering it
    └── threadline.run                        runner.py: one job, one agent run
        ├── UPDATE ... / INSERT ...           the run's statements (open, commit)
        └── invoke_agent echo                 pydantic-ai's own instrumentation
            ├── chat threadline:echo          a model request
            ├── execute_tool current_time     a tool call
            └── chat threadline:echo

Carrying the request's context into the run. The queue runs each job in a task of its own,
and that task is created from the request's context only on the fast path: a run started by
the debounce timer, by another session's run freeing a concurrency slot, by a recovery, or by
another process that owns the session (Redis) would inherit some other context or none. So
the context is not taken from the task: the coordinator stamps the request's W3C
``traceparent`` (and the time it accepted the message) into the message's run options
(``RunOptions.trace``), which are stored with the message and travel with Redis nudges, and the
runner opens ``threadline.run`` under the context stamped on the newest message it answers,
in whichever task or process it runs.

Merged runs. One run answers every message that merged into it, each sent by a request with
its own trace. The run (model and tool calls included) belongs to the trace of the newest of
those requests, the one whose options it runs with; it links to each other request's
context, and every request's trace gets a ``threadline.queue_wait`` span that links to the run.
A run that is superseded ends its span with ``threadline.run.ending=superseded``, and the
run replacing it emits the queue-wait spans again: a message's trace holds one per run that
took it up.

Outside requests nothing is traced: the Redis lease renewals, the watchdog and the webhook
poller would otherwise each start a trace every few hundred milliseconds, so a client span
(a statement, a Redis command) with no parent is not sampled.

asyncpg and Redis are instrumented process-wide (their instrumentors patch the libraries);
FastAPI and the agents are instrumented per app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes
from pydantic_ai.models.instrumented import InstrumentationSettings

from threadline import __version__

if TYPE_CHECKING:
    from fastapi import FastAPI

    from threadline.config import Settings
    from threadline.queue.job import Job, Outcome
    from threadline.store import Turn

# The key of the acceptance time, next to W3C's ``traceparent``/``tracestate`` in
# ``RunOptions.trace``; propagators ignore keys they do not know.
ACCEPTED = "threadline-accepted-ns"


class RequestsOnly(Sampler):
    """Sample what a request starts; drop client spans (SQL, Redis) that have no parent."""

    def __init__(self) -> None:
        self._inner = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind == SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "RequestsOnly"


class Tracing:
    """A tracer provider and what threadline traces with it. See the module docstring."""

    def __init__(self, processor: SpanProcessor, *, include_content: bool = False) -> None:
        self.provider = TracerProvider(
            sampler=RequestsOnly(),
            # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when set, win over this. Not
            # ``Resource.create``: its detectors run in a thread pool, and create_app may be
            # called on the event loop (uvicorn's factory).
            resource=Resource({"service.name": "threadline", "service.version": __version__}).merge(
                OTELResourceDetector().detect()
            ),
        )
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("threadline", __version__)
        # Per agent (``agent.instrument``, registry.py), not ``Agent.instrument_all``: the
        # process may serve apps built with other settings. Prompts and replies stay out of
        # spans unless asked for: they are the users' words.
        self.agents = InstrumentationSettings(
            tracer_provider=self.provider, include_content=include_content
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        """OTLP over HTTP/protobuf, to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter reads it,
        with the other ``OTEL_EXPORTER_OTLP_*`` variables; localhost:4318 if unset)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(
            BatchSpanProcessor(OTLPSpanExporter()),
            include_content=settings.otel_include_content,
        )

    def instrument_app(self, app: FastAPI) -> None:
        # A span per ASGI receive and send would outnumber everything else in a stream.
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=self.provider, exclude_spans=["receive", "send"]
        )

    @contextlib.asynccontextmanager
    async def instrumenting(self) -> AsyncIterator[None]:
        """asyncpg and Redis traced while the app runs; spans flushed when it stops."""
        instrumentors = (AsyncPGInstrumentor(), RedisInstrumentor())  # type: ignore[no-untyped-call]

        def instrument() -> None:
            for instrumentor in instrumentors:
                instrumentor.instrument(tracer_provider=self.provider)

        # In a thread: each instrumentor checks its library's version in the installed
        # packages' metadata, reading files.
        await asyncio.to_thread(instrument)
        try:
            yield
        finally:
            for instrumentor in instrumentors:
                instrumentor.uninstrument()
            # The exporter posts whatever is left over HTTP: off the event loop.
            await asyncio.shield(asyncio.to_thread(self.provider.force_flush))

    def stamp(self) -> dict[str, str]:
        """The current (request's) context as ``RunOptions.trace``, with the acceptance time."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        carrier[ACCEPTED] = str(time.time_ns())
        return carrier

    @contextlib.contextmanager
    def running(self, job: Job) -> Iterator[RunSpan]:
        """``threadline.run`` around one job, current in the runner's task, under the context
        stamped on the newest message the run answers (a new trace if it has none)."""
        stamped = job.options.trace if job.options is not None else None
        attributes = {
            "threadline.session_id": str(job.session_id),
            "threadline.run_id": str(job.run_id),
        }
        if job.options is not None:
            attributes["threadline.agent"] = job.options.agent
        started = time.time_ns()  # where the queue waits of its messages end
        with self._tracer.start_as_current_span(
            "threadline.run",
            # Never the task's own context: it may be another request's (module docstring).
            context=_extract(stamped),
            attributes=attributes,
            start_time=started,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            run = RunSpan(self._tracer, span, stamped, started)
            try:
                yield run
            except asyncio.CancelledError:
                span.set_attribute("threadline.run.ending", job.cancel_reason or "cancelled")
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise


class RunSpan:
    """One run's span, told what the run opened and how it ended."""

    def __init__(
        self,
        tracer: trace.Tracer,
        span: trace.Span,
        stamped: Mapping[str, str] | None,
        started_ns: int,
    ) -> None:
        self._tracer = tracer
        self.span = span
        self._parent = stamped.get("traceparent") if stamped else None
        self._started_ns = started_ns

    def opened(self, turn: Turn) -> None:
        """The run is open and answers ``turn.prompt``: a queue-wait span in each message's
        trace, and a link to every request but the one the run belongs to."""
        self.span.set_attribute("threadline.messages", len(turn.prompt))
        run = self.span.get_span_context()
        for message in turn.prompt:
            raw = message.options.get("trace") if message.options else None
            if not isinstance(raw, dict):
                continue  # stored while tracing was off
            carrier = {str(k): str(v) for k, v in raw.items()}
            self._queue_wait(carrier, run, str(message.id))
            if carrier.get("traceparent") != self._parent:
                linked = trace.get_current_span(_extract(carrier)).get_span_context()
                if linked.is_valid:
                    self.span.add_link(linked, {"threadline.message_id": str(message.id)})

    def _queue_wait(
        self, carrier: Mapping[str, str], run: trace.SpanContext, message_id: str
    ) -> None:
        # Clamped: the acceptance was stamped by whichever process took the message, whose
        # clock may run a little ahead of this one's.
        accepted = min(int(carrier.get(ACCEPTED, self._started_ns)), self._started_ns)
        span = self._tracer.start_span(
            "threadline.queue_wait",
            context=_extract(carrier),
            start_time=accepted,
            links=[Link(run)],
            attributes={"threadline.message_id": message_id},
        )
        span.end(end_time=self._started_ns)

    def ended(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.span.set_attribute("threadline.run.ending", "failed")
            self.span.set_attribute("threadline.error_code", outcome.error.code)
            self.span.set_status(Status(StatusCode.ERROR, outcome.error.code))
        else:
            self.span.set_attribute("threadline.run.ending", "succeeded")


def _extract(carrier: Mapping[str, str] | None) -> Context:
    # Into an empty context: without a traceparent the span starts a trace of its own rather
    # than joining whatever context the calling task happens to carry.
    return propagate.extract(carrier or {}, context=Context())
