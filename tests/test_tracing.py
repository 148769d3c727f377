"""OpenTelemetry tracing through the SDK's in-memory exporter: one request, one trace, with
its queue wait, run, model and tool calls and statements; a merged run in the newest
request's trace, linked from the others; nothing of OpenTelemetry loaded when it is off."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.apps import _settings, services
from tests.serving import modules_an_app_loads
from threadline.agents import AgentSpec
from threadline.app import create_app
from threadline.config import Settings
from threadline.tracing import Tracing

Started = contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, FastAPI]]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    found = InMemorySpanExporter()
    yield found
    found.shutdown()


@pytest.fixture
def traced_app(
    database_url: str, coordinator_url: str | None, exporter: InMemorySpanExporter
) -> Any:
    @contextlib.asynccontextmanager
    async def start(
        agents: Sequence[AgentSpec] = (), **overrides: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
        tracing = Tracing(SimpleSpanProcessor(exporter))
        settings = _settings(database_url, coordinator_url, **overrides)
        app = create_app(settings, agents, tracing=tracing)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://threadline", timeout=30
            ) as client:
                yield client, app

    return start


def by_trace(spans: Sequence[ReadableSpan]) -> dict[int, list[ReadableSpan]]:
    traces: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        assert span.context is not None
        traces.setdefault(span.context.trace_id, []).append(span)
    return traces


def named(spans: Sequence[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, span.name
    [parent] = [
        s for s in spans if s.context is not None and s.context.span_id == span.parent.span_id
    ]
    return parent


async def tool_call_trace(
    traced_app: Any, exporter: InMemorySpanExporter, **settings: Any
) -> tuple[Any, list[Any]]:
    """One request whose reply calls a tool: the response and the spans of its trace."""
    async with traced_app(**settings) as (client, _):
        exporter.clear()  # start-up's statements (migrations) are not the request's
        reply = await client.post(
            "/api/v1/agent/echo/run", json={"message_content": "/call current_time {}"}
        )
        assert reply.status_code == 200, reply.text
        assert "[current_time -> " in reply.json()["message"]
    traces = by_trace(exporter.get_finished_spans())
    [spans] = [t for t in traces.values() if named(t, "POST /api/v1/agent")]
    return reply, spans


@pytest.mark.parametrize("backend", ["postgres", "postgres+redis"], indirect=True)
async def test_one_request_is_one_trace_from_http_to_tool_call(
    traced_app: Any, exporter: InMemorySpanExporter, backend: str
) -> None:
    # The agent graph from the first request (the direct path's trace: the next test).
    reply, spans = await tool_call_trace(traced_app, exporter, direct_model_requests=False)
    [http] = named(spans, "POST /api/v1/agent/{name}/run")
    assert http.parent is None
    [wait] = named(spans, "threadline.queue_wait")
    [run] = named(spans, "threadline.run")
    assert parent_of(wait, spans) is http
    assert parent_of(run, spans) is http
    assert run.attributes is not None
    assert run.attributes["threadline.run_id"] == reply.json()["run_id"]
    assert run.attributes["threadline.run.ending"] == "succeeded"
    assert (
        wait.links[0].context.span_id == run.context.span_id
    )  # the wait names the run that ended it
    assert wait.end_time is not None
    assert run.start_time is not None
    assert wait.end_time <= run.start_time
    [agent] = named(spans, "invoke_agent echo")
    assert parent_of(agent, spans) is run
    models = named(spans, "chat threadline:echo")
    assert len(models) == 2  # the tool call, then the reply
    [tool] = named(spans, "execute_tool current_time")
    assert {parent_of(s, spans).name for s in [*models, tool]} == {"invoke_agent echo"}
    systems = {s.attributes.get("db.system") for s in spans if s.attributes is not None}
    assert "postgresql" in systems
    sql = [s for s in spans if s.attributes and s.attributes.get("db.system") == "postgresql"]
    # The insert under the request, the commit under the run.
    assert {parent_of(s, spans).name for s in sql} >= {http.name, "threadline.run"}
    if backend.endswith("+redis"):
        assert "redis" in systems


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_tool_call_on_the_direct_path_hands_the_run_to_the_graph_in_one_trace(
    traced_app: Any, exporter: InMemorySpanExporter
) -> None:
    """The direct request (its span under the run) answers with a tool call; the graph takes
    the turn over (``invoke_agent`` under the run), its first request answered by that same
    response (a second span for it), then runs the tool and asks the model again."""
    _, spans = await tool_call_trace(traced_app, exporter)
    [run] = named(spans, "threadline.run")
    [agent] = named(spans, "invoke_agent echo")
    assert parent_of(agent, spans) is run
    models = named(spans, "chat threadline:echo")
    assert sorted(parent_of(s, spans).name for s in models) == [
        "invoke_agent echo",
        "invoke_agent echo",
        "threadline.run",
    ]
    [tool] = named(spans, "execute_tool current_time")
    assert parent_of(tool, spans) is agent


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_direct_model_request_keeps_its_model_span_under_the_run(
    traced_app: Any, exporter: InMemorySpanExporter
) -> None:
    """THREADLINE_DIRECT_MODEL_REQUESTS: no agent graph, so no ``invoke_agent`` span, but the
    model request is traced as the graph's is, under the run."""
    spec = AgentSpec(name="plain", model="threadline:echo")  # no tools: the direct path
    async with traced_app([spec], direct_model_requests=True) as (client, _):
        exporter.clear()
        reply = await client.post("/api/v1/agent/plain/run", json={"message_content": "hi"})
        assert reply.status_code == 200, reply.text
    traces = by_trace(exporter.get_finished_spans())
    [spans] = [t for t in traces.values() if named(t, "POST /api/v1/agent")]
    [run] = named(spans, "threadline.run")
    assert not named(spans, "invoke_agent")
    [model] = named(spans, "chat threadline:echo")
    assert parent_of(model, spans) is run
    assert model.attributes is not None
    assert model.attributes["gen_ai.usage.input_tokens"] > 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_merged_run_is_in_the_newest_requests_trace_and_linked_from_the_others(
    traced_app: Any, exporter: InMemorySpanExporter
) -> None:
    # A debounce window: the run starts from a timer, in no request's context at all.
    async with traced_app(merge_window_ms=300) as (client, app):
        store = services(app).store
        sid = (await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")).id
        first = asyncio.create_task(
            client.post(
                "/api/v1/agent/echo/run",
                json={"message_content": "one", "session_id": str(sid)},
                headers={"x-test": "first"},
            )
        )
        while not await store.unanswered(sid):
            await asyncio.sleep(0.01)  # the first message is stored before the second is sent
        second = await client.post(
            "/api/v1/agent/echo/run", json={"message_content": "two", "session_id": str(sid)}
        )
        first_reply = await first
    assert first_reply.json()["run_id"] == second.json()["run_id"]
    spans = exporter.get_finished_spans()
    traces = by_trace(spans)
    requests = [t for t in traces.values() if named(t, "POST /api/v1/agent")]
    assert len(requests) == 2
    [run] = named(spans, "threadline.run")
    assert run.context is not None
    newest = traces[run.context.trace_id]
    [older] = [t for t in requests if t is not newest]
    # The newest request's trace holds the run, the model call, and its own wait.
    assert parent_of(run, newest).kind.name == "SERVER"
    assert named(newest, "chat threadline:echo")
    assert len(named(newest, "threadline.queue_wait")) == 1
    # The older request's trace holds its wait, linked to the run; the run links back.
    [older_http] = named(older, "POST /api/v1/agent")
    [older_wait] = named(older, "threadline.queue_wait")
    assert parent_of(older_wait, older) is older_http
    assert older_wait.links[0].context.span_id == run.context.span_id
    assert [link.context.trace_id for link in run.links] == [older_http.context.trace_id]
    assert run.attributes is not None
    assert run.attributes["threadline.messages"] == 2


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_a_run_in_another_process_joins_the_trace_of_the_request_it_answers(
    traced_app: Any, exporter: InMemorySpanExporter
) -> None:
    # Two servers on one PostgreSQL and Redis. The owner runs the first message slowly; the
    # second reaches the other server, which stores it and nudges the owner: the owner's
    # new run (superseding its first) answers both, in the second request's trace.
    async with (
        traced_app(echo_delay_ms=400) as (owner, app),
        traced_app() as (other, other_app),
    ):
        store = services(app).store
        sid = (await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")).id
        first = asyncio.create_task(
            owner.post(
                "/api/v1/agent/echo/run", json={"message_content": "one", "session_id": str(sid)}
            )
        )
        while not (await store.list_runs(sid))[0]:
            await asyncio.sleep(0.01)  # the owner's first run is open
        second = await other.post(
            "/api/v1/agent/echo/run", json={"message_content": "two", "session_id": str(sid)}
        )
        first_reply = await first
        assert services(other_app).registry.stats.started == 0  # every run was the owner's
    assert second.status_code == 200, second.text
    assert first_reply.json()["run_id"] == second.json()["run_id"]
    spans = exporter.get_finished_spans()
    traces = by_trace(spans)
    runs = named(spans, "threadline.run")
    endings = {s.attributes["threadline.run.ending"]: s for s in runs if s.attributes}
    assert set(endings) == {"superseded", "succeeded"}
    answered, superseded = endings["succeeded"], endings["superseded"]
    assert answered.context is not None
    assert superseded.context is not None
    newest = traces[answered.context.trace_id]
    [http] = named(newest, "POST /api/v1/agent")
    assert parent_of(answered, newest) is http
    assert named(newest, "chat threadline:echo")
    assert named(newest, "threadline.queue_wait")
    # The superseded run was in the first request's trace, which the answering run links to.
    older = traces[superseded.context.trace_id]
    assert older is not newest
    assert named(older, "POST /api/v1/agent")
    assert [link.context.trace_id for link in answered.links] == [superseded.context.trace_id]


def test_tracing_is_on_with_the_standard_endpoint_or_threadline_otel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("THREADLINE_OTEL", raising=False)
    assert not Settings(_env_file=None).tracing  # type: ignore[call-arg]
    monkeypatch.setenv("THREADLINE_OTEL", "1")
    assert Settings(_env_file=None).tracing  # type: ignore[call-arg]
    monkeypatch.delenv("THREADLINE_OTEL")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert Settings(_env_file=None).tracing  # type: ignore[call-arg]


@pytest.mark.allow_blocking
def test_without_tracing_no_opentelemetry_code_is_loaded(tmp_path: Any) -> None:
    env = {
        k: v for k, v in os.environ.items() if k != "THREADLINE_OTEL" and not k.startswith("OTEL_")
    }
    # (pydantic-ai imports parts of the OpenTelemetry API and SDK itself.)
    ours = ("threadline.tracing", "opentelemetry.instrumentation", "opentelemetry.exporter")
    database = f"sqlite:///{tmp_path}/untraced.db"
    seen = modules_an_app_loads(database, "threadline:echo", ours, env)
    assert seen["stopped"] == []
