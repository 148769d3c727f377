"""THREADLINE_DIRECT_MODEL_REQUESTS: an agent without tools answered by one direct model request
must look exactly like the agent graph's run: the same request to the provider (instructions,
history, settings), the same stored history, usage, streamed deltas, and errors. Each test runs
the same inputs both ways and compares."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic_ai import RunContext, Tool
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelResponse,
    TextPart,
    ThinkingPart,
    ToolCallPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.tools import ToolDefinition
from pydantic_ai.usage import RequestUsage

from tests.agents.test_openai_compat import read_events
from tests.api.test_metrics import scrape, value
from tests.apps import AppFactory, services
from tests.fake_openai import running_fake_openai
from threadline.agents import AgentSpec
from threadline.agents.builtin import current_time
from threadline.agents.echo import last_prompt

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

# Bookkeeping pydantic-ai's graph stamps on its own messages and the direct request does not;
# no provider receives them (the fake OpenAI server sees identical bodies) and threadline never
# stores a tool-less run's messages (its reply is stored as text).
_RUN_BOOKKEEPING = {"timestamp", "run_id", "conversation_id"}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in _RUN_BOOKKEEPING}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def comparable(messages: list[ModelMessage]) -> Any:
    return _plain(ModelMessagesTypeAdapter.dump_python(messages, mode="json"))


@dataclass
class Recorder:
    """A FunctionModel that records what it was sent and answers ``parts`` (default: echo)."""

    parts: list[Any] | None = None
    fail: Exception | None = None
    seen: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    def _record(self, messages: list[ModelMessage], info: AgentInfo) -> None:
        self.seen.append(
            (
                comparable(messages),
                {
                    "instructions": info.instructions,
                    "model_settings": info.model_settings,
                    "function_tools": info.function_tools,
                    "output_tools": info.output_tools,
                    "allow_text_output": info.allow_text_output,
                    "parameters": info.model_request_parameters,
                },
            )
        )
        if self.fail is not None:
            raise self.fail

    def answer(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self._record(messages, info)
        parts = self.parts or [TextPart(f"echo: {last_prompt(messages)}")]
        return ModelResponse(parts=parts, usage=RequestUsage(input_tokens=11, output_tokens=4))

    async def stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        self._record(messages, info)
        for piece in ("echo: ", *last_prompt(messages).split()):
            yield piece

    def model(self) -> FunctionModel:
        return FunctionModel(self.answer, stream_function=self.stream, model_name="recorder")


async def converse(
    make_app: AppFactory, spec: AgentSpec, direct: bool, *, stream: bool = False
) -> dict[str, Any]:
    """Two turns of one session (the second with history), through the native API."""
    async with make_app(agents=[spec], direct_model_requests=direct) as (client, app):
        assert (await services(app).registry.get(spec.name)).direct is direct
        replies, deltas = [], []
        sid = None
        for text in ("hello there", "and again"):
            body: dict[str, Any] = {"message_content": text, "stream": stream}
            if sid is not None:
                body["session_id"] = sid
            url = f"/api/v1/agent/{spec.name}/run"
            if stream:
                events = await read_events(client, url, json=body)
                assert events[-1].kind == "run.completed", events
                deltas.append([e.data["delta"] for e in events if e.kind == "text.delta"])
                final = events[-1].data
                reply = {k: final[k] for k in ("message", "tool_calls", "tool_outputs", "usage")}
                sid = final["session_id"]
            else:
                response = await client.post(url, json=body)
                assert response.status_code == 200, response.text
                reply = {
                    k: response.json()[k]
                    for k in ("message", "tool_calls", "tool_outputs", "usage")
                }
                sid = response.json()["session_id"]
            replies.append(reply)
        store = services(app).store
        rows, _ = await store.list_messages(uuid.UUID(sid))
    history = [(m.role, m.content, m.payload) for m in rows]
    return {"replies": replies, "history": history, "deltas": deltas}


@pytest.mark.parametrize("stream", [False, True])
async def test_function_model_sees_and_answers_the_same_both_ways(
    make_app: AppFactory, stream: bool
) -> None:
    runs = {}
    for direct in (False, True):
        model = Recorder()
        spec = AgentSpec(
            name="plain",
            instructions="Be brief.",
            model=model.model(),
            model_settings={"temperature": 0.25},
        )
        runs[direct] = (await converse(make_app, spec, direct, stream=stream), model.seen)
    (graph, graph_seen), (direct_run, direct_seen) = runs[False], runs[True]
    assert direct_run == graph
    assert direct_seen == graph_seen
    assert len(graph_seen) == 2
    # What was compared is what was meant: history and instructions reached the model.
    [*history, _] = graph_seen[1][0]
    assert len(history) == 2
    assert graph_seen[1][1]["instructions"] == "Be brief."
    assert graph["replies"][1]["usage"]["requests"] == 1
    if stream:
        assert graph["deltas"][1] == ["echo: ", "and", "again"]


async def test_text_parts_join_as_the_graph_joins_them(make_app: AppFactory) -> None:
    parts = [ThinkingPart("hmm"), TextPart("one "), ThinkingPart("hmm"), TextPart("two")]
    runs = [
        await converse(make_app, AgentSpec(name="plain", model=Recorder(parts).model()), direct)
        for direct in (False, True)
    ]
    assert runs[0] == runs[1]
    assert runs[0]["replies"][0]["message"] == "one two"


def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


@pytest.mark.parametrize("tools", [(), (lookup, current_time)], ids=["no-tools", "tools"])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_provider_receives_the_same_request_both_ways(
    make_app: AppFactory, stream: bool, tools: tuple[Any, ...]
) -> None:
    results = {}
    for direct in (False, True):
        async with running_fake_openai() as fake:
            spec = AgentSpec(
                name="remote",
                instructions="Be brief.",
                model=f"openai-compat:fake-model@{fake.base_url}",
                model_settings={"temperature": 0.25, "max_tokens": 50},
                tools=tools,
            )
            talk = await converse(make_app, spec, direct, stream=stream)
        results[direct] = (talk, fake.requests)
    assert results[True] == results[False]
    talk, sent = results[False]
    # The tools' definitions went out with every request, as the graph resolves them.
    assert [t["function"]["name"] for t in sent[0].get("tools", [])] == [t.__name__ for t in tools]
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["temperature"] == 0.25
    assert talk["replies"][1]["usage"]["input_tokens"] == 7
    if stream:
        assert talk["deltas"][1] == ["fake: ", "and ", "again"]


async def test_a_callers_instructions_join_the_agents_the_same_both_ways(
    make_app: AppFactory,
) -> None:
    sent = {}
    for direct in (False, True):
        async with running_fake_openai() as fake:
            spec = AgentSpec(
                name="remote",
                instructions="Be brief.",
                model=f"openai-compat:fake-model@{fake.base_url}",
            )
            async with make_app(agents=[spec], direct_model_requests=direct) as (client, _):
                body = {"model": "remote", "input": "hi", "instructions": "Answer in French."}
                response = await client.post("/v1/responses", json=body)
                assert response.status_code == 200, response.text
        sent[direct] = fake.requests
    assert sent[True] == sent[False]
    system = [m["content"] for m in sent[False][0]["messages"] if m["role"] == "system"]
    assert "Answer in French." in "".join(system)


async def fail_both_ways(make_app: AppFactory, model: FunctionModel, **settings: Any) -> list[Any]:
    results = []
    for direct in (False, True):
        spec = AgentSpec(name="plain", model=model)
        async with make_app(agents=[spec], direct_model_requests=direct, **settings) as (
            client,
            _,
        ):
            response = await client.post("/api/v1/agent/plain/run", json={"message_content": "x"})
            error = response.json()["error"]
            run = (await client.get(f"/api/v1/runs/{error['run_id']}")).json()
            results.append(
                (response.status_code, error["code"], error["message"], run["error_code"])
            )
    return results


async def test_a_provider_error_maps_the_same_both_ways(make_app: AppFactory) -> None:
    model = Recorder(fail=ModelHTTPError(status_code=500, model_name="recorder", body="boom"))
    graph, direct = await fail_both_ways(make_app, model.model())
    assert graph == direct
    assert graph[:2] == (502, "model_error")


async def test_a_provider_http_error_from_the_real_client_maps_the_same_both_ways(
    make_app: AppFactory,
) -> None:
    # Nothing listens there: the OpenAI SDK's connection error, after its own retries.
    spec_model = "openai-compat:m@http://127.0.0.1:9/v1"
    results = []
    for direct in (False, True):
        spec = AgentSpec(name="remote", model=spec_model, model_settings={"max_tokens": 5})
        async with make_app(agents=[spec], direct_model_requests=direct) as (client, _):
            response = await client.post("/api/v1/agent/remote/run", json={"message_content": "x"})
            results.append((response.status_code, response.json()["error"]["code"]))
    assert results[0] == results[1] == (502, "model_error")


async def test_a_timeout_maps_the_same_both_ways(make_app: AppFactory) -> None:
    async def never(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    graph, direct = await fail_both_ways(make_app, FunctionModel(never), model_timeout_s=0.2)
    assert graph == direct
    assert graph[:2] == (504, "model_timeout")


@dataclass
class Scripted(Recorder):
    """A Recorder whose n-th call answers ``script[n]``: a list of parts (a streamed call
    sends a text part as its text and a tool call as a tool-call delta), or "echo"."""

    script: list[Any] = field(default_factory=list)

    def _next(self, messages: list[ModelMessage], info: AgentInfo) -> Any:
        self._record(messages, info)
        step = self.script[min(len(self.seen), len(self.script)) - 1]
        return [TextPart(f"echo: {last_prompt(messages)}")] if step == "echo" else step

    def answer(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(
            parts=self._next(messages, info), usage=RequestUsage(input_tokens=11, output_tokens=4)
        )

    async def stream(
        self, messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[str | DeltaToolCalls]:
        for part in self._next(messages, info):
            if isinstance(part, TextPart):
                yield part.content
            else:
                args = json.dumps(part.args_as_dict())
                yield {0: DeltaToolCall(part.tool_name, args, tool_call_id=part.tool_call_id)}


_UNKNOWN_TOOL = [ToolCallPart("no_such_tool", {}, tool_call_id="c1")]


@pytest.mark.parametrize(
    ("script", "stream"),
    [
        ([[], "echo"], False),  # no text: the graph asks again
        ([_UNKNOWN_TOOL, "echo"], False),  # a tool the agent does not have
        ([[TextPart("first "), *_UNKNOWN_TOOL], "echo"], False),  # text beside that call
        ([_UNKNOWN_TOOL, "echo"], True),
        ([[TextPart("first "), *_UNKNOWN_TOOL], "echo"], True),  # its text streamed once
    ],
    ids=[
        "empty",
        "unknown-tool",
        "text-and-unknown-tool",
        "unknown-tool-streamed",
        "text-and-unknown-tool-streamed",
    ],
)
async def test_a_response_the_graph_retries_is_retried_the_same_both_ways(
    make_app: AppFactory, script: list[Any], stream: bool
) -> None:
    """The direct request's response that does not end the run (no text, or a tool call)
    hands the run to the graph, which carries on from it: the same retry prompt to the
    model, the same stored messages (the tool traffic in the payload), usage and deltas."""
    runs = {}
    for direct in (False, True):
        model = Scripted(script=[*script, "echo"])
        spec = AgentSpec(name="plain", instructions="Be brief.", model=model.model())
        talk = await converse(make_app, spec, direct, stream=stream)
        payloads = [json.loads(p) if p else None for _, _, p in talk.pop("history")]
        runs[direct] = (talk, [_plain(p) for p in payloads], model.seen)
    assert runs[True] == runs[False]
    talk, payloads, seen = runs[False]
    # What was compared is what was meant: the first turn took two requests, the second was
    # sent after the first response, and the second turn one request.
    assert len(seen) == 3
    first_call, retry_call = seen[0][0], seen[1][0]
    assert retry_call[: len(first_call)] == first_call
    assert [m["kind"] for m in retry_call[len(first_call) :]] == ["response", "request"]
    assert talk["replies"][0]["usage"]["requests"] == 2
    if not stream:  # two requests' usage (a streamed FunctionModel estimates its own)
        assert talk["replies"][0]["usage"]["input_tokens"] == 22
    assert talk["replies"][0]["message"].startswith("echo: ")
    if any(isinstance(part, ToolCallPart) for part in script[0]):
        assert payloads[1] is not None  # the tool traffic, stored as the graph stores it
    if stream:  # each response's text, streamed once
        text = "".join(p.content for p in script[0] if isinstance(p, TextPart))
        assert "".join(talk["deltas"][0]) == text + talk["replies"][0]["message"]


async def test_a_model_that_never_answers_with_text_fails_the_same_both_ways(
    make_app: AppFactory,
) -> None:
    model = Scripted(script=[[]])  # every call: no text
    graph, direct = await fail_both_ways(make_app, model.model())
    assert graph == direct
    assert graph[:2] == (502, "model_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_with_tools_calls_them_the_same_both_ways(
    make_app: AppFactory, stream: bool
) -> None:
    """The direct request's response calls a tool: the graph takes the turn over, runs the
    tool and asks the model again, as it does on its own. The model sees the same tools, the
    caller the same tool calls, results, deltas and usage, the store the same messages."""
    runs = {}
    for direct in (False, True):
        call = ToolCallPart("lookup", {"key": "a"}, tool_call_id="c1")
        model = Scripted(script=[[call], "echo", "echo"])
        spec = AgentSpec(name="tooled", model=model.model(), tools=(lookup,))
        talk = await converse(make_app, spec, direct, stream=stream)
        payloads = [json.loads(p) if p else None for _, _, p in talk.pop("history")]
        runs[direct] = (talk, [_plain(p) for p in payloads], model.seen)
    assert runs[True] == runs[False]
    talk, payloads, seen = runs[False]
    assert [t.name for t in seen[0][1]["function_tools"]] == ["lookup"]
    first = talk["replies"][0]
    assert [c["tool_name"] for c in first["tool_calls"]] == ["lookup"]
    assert first["tool_outputs"][0]["content"] == "value of a"
    assert first["usage"]["requests"] == 2
    assert payloads[1] is not None
    # The second turn's text answer came from the direct request alone: one request.
    assert talk["replies"][1]["usage"]["requests"] == 1


async def test_tool_objects_keep_the_graph(make_app: AppFactory) -> None:
    """A ``Tool`` may change its definition per run (``prepare``), per model or per history,
    which the definitions read once when the agent loads would miss: only plain functions."""

    async def only_sometimes(ctx: RunContext[Any], tool_def: ToolDefinition) -> ToolDefinition:
        return tool_def

    specs = [
        AgentSpec(name="dynamic", tools=(Tool(lookup, prepare=only_sometimes),)),
        AgentSpec(name="wrapped", tools=(Tool(lookup),)),
    ]
    async with make_app(agents=specs, direct_model_requests=True) as (_, app):
        assert not (await services(app).registry.get("dynamic")).direct
        assert not (await services(app).registry.get("wrapped")).direct
        assert (await services(app).registry.get("echo")).direct


@pytest.mark.parametrize(
    "fail", [None, ModelHTTPError(status_code=500, model_name="recorder"), "retried"]
)
async def test_model_call_metrics_count_the_same_both_ways(
    make_app: AppFactory, fail: Exception | str | None
) -> None:
    labels = {"agent": "plain", "model": "recorder"}
    duration = "threadline_model_call_duration_seconds_count"
    errors = "threadline_model_call_errors_total"
    counted = []
    for direct in (False, True):
        if isinstance(fail, str):  # no text first: the graph's retry, replayed on the direct path
            model = Scripted(script=[[], "echo"]).model()
        else:
            model = Recorder(fail=fail).model()
        spec = AgentSpec(name="plain", model=model)
        async with make_app(agents=[spec], direct_model_requests=direct) as (client, _):
            _, before = await scrape(client)
            await client.post("/api/v1/agent/plain/run", json={"message_content": "x"})
            _, after = await scrape(client)
        counted.append(
            tuple(
                value(after, name, **labels) - value(before, name, **labels)
                for name in (duration, errors)
            )
        )
    assert counted[0] == counted[1]
    if fail is None:
        assert counted[0] == (1.0, 0.0)
    elif fail == "retried":  # both requests timed, the replayed one once
        assert counted[0] == (2.0, 0.0)
    else:
        assert counted[0] == (0.0, 1.0)
