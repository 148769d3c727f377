"""Provider clients: one shared, pooled HTTP client per endpoint, sized to the runs in flight,
closed with the app; every provider kind builds on it, and the OpenAI ones run on it."""

from __future__ import annotations

import importlib
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx2
import pytest
from anthropic import AsyncAnthropic
from groq import AsyncGroq
from openai import AsyncOpenAI
from pydantic_ai import Agent, ModelRequest
from pydantic_ai.direct import model_request, model_request_stream
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.groq import GroqModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.groq import GroqProvider
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.tools import ToolDefinition

from tests.apps import AppFactory, services
from tests.fake_openai import running_fake_openai
from tests.serving import modules_an_app_loads
from threadline.agents import AgentRegistry, AgentSpec
from threadline.agents.anthropic_client import ValidatingAnthropic
from threadline.agents.clients import ProviderClients, Transport
from threadline.agents.completions import PlainBodyGroq, PlainBodyOpenAI

TRANSPORTS: list[Transport] = ["httpx", "aiohttp"]


def http_of(model: Model) -> Any:
    """The HTTP client under a pydantic-ai model's SDK client."""
    sdk = model.client  # type: ignore[attr-defined]
    api_client = getattr(sdk, "_api_client", None)  # google-genai
    if api_client is not None:
        return api_client._async_httpx_client
    return sdk._client


def pool_limits(http: Any) -> tuple[int | None, int | None]:
    transport = http._transport
    limits = getattr(transport, "limits", None)  # aiohttp's transport keeps the Limits
    if limits is not None:
        return limits.max_connections, limits.max_keepalive_connections
    pool = transport._pool
    return pool._max_connections, pool._max_keepalive_connections


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_agents_on_one_endpoint_and_key_share_one_client_closed_with_the_app(
    make_app: AppFactory, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TL_KEY_A", "key-a")
    monkeypatch.setenv("TL_KEY_B", "key-b")
    async with running_fake_openai() as fake:
        url = fake.base_url
        specs = [
            AgentSpec(name="one", model=f"openai-compat:m1@{url}#TL_KEY_A"),
            AgentSpec(name="two", model=f"openai-compat:m2@{url}#TL_KEY_A"),
            AgentSpec(name="other-key", model=f"openai-compat:m1@{url}#TL_KEY_B"),
        ]
        overrides = {"provider_http": transport, "max_concurrent_runs": 7}
        async with make_app(agents=specs, **overrides) as (client, app):
            registry = services(app).registry
            one, two, other = [(await registry.get(s.name)).model for s in specs]
            for name in ("one", "two", "other-key"):
                reply = await client.post(
                    f"/api/v1/agent/{name}/run", json={"message_content": "hi"}
                )
                assert reply.status_code == 200, reply.text
            assert one.client is two.client  # type: ignore[attr-defined]
            assert http_of(one) is http_of(two)
            assert http_of(other) is not http_of(one)
            shared = http_of(one)
            assert isinstance(shared, httpx2.AsyncClient)
            assert (type(shared).__name__ == "_InstalledAioHttpClient") is (transport == "aiohttp")
            assert pool_limits(shared) == (7, 7)
            assert not shared.is_closed
        assert shared.is_closed
        assert http_of(other).is_closed
    assert [h["authorization"] for h in fake.headers] == [
        "Bearer key-a",
        "Bearer key-a",
        "Bearer key-b",
    ]


KINDS = {
    "openai:gpt-4o": "OpenAIResponsesModel",
    "openai-chat:gpt-4o": "OpenAIChatModel",
    "anthropic:claude-sonnet-4-5": "AnthropicModel",
    "google:gemini-2.5-flash": "GoogleModel",
    "groq:llama-3.3-70b-versatile": "GroqModel",
}


@pytest.fixture
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GROQ_API_KEY"):
        monkeypatch.setenv(var, "test-key")


@pytest.mark.usefixtures("provider_keys")
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_provider_kind_builds_on_a_shared_pooled_client(transport: Transport) -> None:
    clients = ProviderClients(pool_size=5, transport=transport)
    specs = [AgentSpec(name=f"a{i}", model=name) for i, name in enumerate(KINDS)]
    # A second agent of each kind, to see it share.
    specs += [AgentSpec(name=f"b{i}", model=name) for i, name in enumerate(KINDS)]
    registry = AgentRegistry(specs, default_model="threadline:echo", clients=clients)
    await registry.start()
    try:
        for i, kind in enumerate(KINDS.values()):
            first = (await registry.get(f"a{i}")).model
            again = (await registry.get(f"b{i}")).model
            assert type(first).__name__ == kind
            http = http_of(first)
            assert http_of(again) is http
            assert pool_limits(http) == (5, 5)
            on_aiohttp = type(http).__name__ == "_InstalledAioHttpClient"
            # Google's and Groq's SDKs have no aiohttp client: httpx for them.
            expected = transport == "aiohttp" and kind not in ("GoogleModel", "GroqModel")
            assert on_aiohttp is expected, kind
            if kind == "AnthropicModel":  # built again from what pydantic-ai read and checked
                assert isinstance(first.client, ValidatingAnthropic)  # type: ignore[attr-defined]
                assert first.client.api_key == "test-key"  # type: ignore[attr-defined]
        # openai:, openai-chat: (one environment) share one client, as do everyone's kinds.
        assert http_of((await registry.get("a0")).model) is http_of(
            (await registry.get("a1")).model
        )
        opened = list(clients._http)
        assert len(opened) == 4  # openai, anthropic, google, groq
    finally:
        await registry.aclose()
    assert all(h.is_closed for h in opened)


# provider family: (model, key variable, key, base URL variable, the base URL under the fake
# server's port, the client class its requests skip the SDK's transform with).
FAMILIES: dict[str, tuple[str, str, str, str, str, type[Any]]] = {
    "openai": (
        "openai-chat:fake-model",
        "OPENAI_API_KEY",
        "sk-test",
        "OPENAI_BASE_URL",
        "http://127.0.0.1:{port}/v1",
        PlainBodyOpenAI,
    ),
    # Groq's SDK posts to /openai/v1/chat/completions under its base; the fake takes any path.
    "groq": (
        "groq:fake-model",
        "GROQ_API_KEY",
        "gsk-test",
        "GROQ_BASE_URL",
        "http://127.0.0.1:{port}",
        PlainBodyGroq,
    ),
}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
async def test_a_provider_family_runs_on_the_shared_client_without_the_transform(
    make_app: AppFactory,
    transport: Transport,
    stream: bool,
    family: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_name, key_var, key, base_var, base, client_class = FAMILIES[family]
    async with running_fake_openai() as fake:
        monkeypatch.setenv(key_var, key)
        monkeypatch.setenv(base_var, base.format(port=fake.port))
        spec = AgentSpec(name="remote", model=model_name)
        async with make_app(agents=[spec], provider_http=transport) as (client, app):
            reply = await client.post(
                "/api/v1/agent/remote/run", json={"message_content": "hi there", "stream": stream}
            )
            assert reply.status_code == 200, reply.text
            model = (await services(app).registry.get("remote")).model
            assert any(http_of(model) is h for h in services(app).registry.clients._http)
            # Its bodies skip the SDK's request transform, as an openai-compat endpoint's.
            assert isinstance(model.client, client_class)  # type: ignore[attr-defined]
        if not stream:
            assert reply.json()["message"] == "fake: hi there"
        else:
            assert "fake: hi there" in reply.text
    assert fake.requests[0]["model"] == "fake-model"
    assert fake.requests[0]["messages"][-1] == {"role": "user", "content": "hi there"}
    assert fake.headers[0]["authorization"] == f"Bearer {key}"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_with_an_adaptive_limit_the_pool_holds_its_ceiling(make_app: AppFactory) -> None:
    async with running_fake_openai() as fake:
        spec = AgentSpec(name="remote", model=f"openai-compat:m@{fake.base_url}")
        overrides = {"max_concurrent_runs": "auto", "adaptive_runs_max": 40}
        async with make_app(agents=[spec], **overrides) as (_, app):
            model = (await services(app).registry.get("remote")).model
            assert pool_limits(http_of(model)) == (40, 40)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_per_model_clients_restore_the_sdks_own_for_a_b_measurements(
    make_app: AppFactory,
) -> None:
    async with running_fake_openai() as fake:
        specs = [
            AgentSpec(name="one", model=f"openai-compat:m1@{fake.base_url}"),
            AgentSpec(name="two", model=f"openai-compat:m2@{fake.base_url}"),
        ]
        async with make_app(agents=specs, provider_clients="per-model") as (client, app):
            one, two = [(await services(app).registry.get(s.name)).model for s in specs]
            for name in ("one", "two"):
                reply = await client.post(
                    f"/api/v1/agent/{name}/run", json={"message_content": "hi"}
                )
                assert reply.status_code == 200, reply.text
            assert http_of(one) is not http_of(two)
            # The SDK's own defaults, not the pool sized to the runs in flight.
            assert pool_limits(http_of(one)) == (1000, 100)
        assert http_of(one).is_closed
        assert http_of(two).is_closed


def _lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


def _openai_model(client_class: type[AsyncOpenAI], port: int) -> tuple[Model, Any]:
    sdk = client_class(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    return OpenAIChatModel("m", provider=OpenAIProvider(openai_client=sdk)), sdk


def _groq_model(client_class: type[AsyncGroq], port: int) -> tuple[Model, Any]:
    sdk = client_class(base_url=f"http://127.0.0.1:{port}", api_key="k")
    return GroqModel("m", provider=GroqProvider(groq_client=sdk)), sdk


SDKS: dict[str, tuple[Any, Any, Any]] = {
    "openai": (AsyncOpenAI, PlainBodyOpenAI, _openai_model),
    "groq": (AsyncGroq, PlainBodyGroq, _groq_model),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sdk_name", list(SDKS))
async def test_a_plain_body_client_sends_the_body_the_sdks_own_client_sends(
    stream: bool, sdk_name: str
) -> None:
    """``PlainBodyOpenAI`` and ``PlainBodyGroq`` skip their SDK's request transform
    (agents/completions.py): through pydantic-ai's model, with history, instructions,
    settings and tools, a server receives the same JSON bodies from them as from the SDK's
    own client, with the same headers at the same path."""
    plain_class, our_class, build = SDKS[sdk_name]
    bodies, sent = [], []
    for client_class in (plain_class, our_class):
        async with running_fake_openai() as fake:
            model, sdk = build(client_class, fake.port)
            agent = Agent(
                model,
                instructions="Be brief.",
                tools=[_lookup],
                model_settings={
                    "temperature": 0.25,
                    "max_tokens": 50,
                    "top_p": 0.5,
                    "seed": 7,
                    "stop_sequences": ["END"],
                    "presence_penalty": 0.1,
                    "parallel_tool_calls": False,
                    # The caller's own extra body: merged last, over a field it repeats.
                    "extra_body": {"custom": {"a": [1]}, "top_p": 0.75},
                    "extra_headers": {"X-Test": "1"},
                },
            )
            history = (await agent.run("first")).all_messages()
            if stream:
                async with agent.run_stream("second", message_history=history) as run:
                    await run.get_output()
            else:
                await agent.run("second", message_history=history)
            await sdk.close()
        bodies.append(fake.requests)
        # Each run has a server of its own, so a port of its own.
        headers = [{k: v for k, v in h.items() if k != "host"} for h in fake.headers]
        sent.append(list(zip(fake.targets, headers, strict=True)))
    plain, ours = bodies
    assert ours == plain
    assert sent[1] == sent[0]
    path = "/v1/chat/completions" if sdk_name == "openai" else "/openai/v1/chat/completions"
    assert {target for target, _ in sent[0]} == {f"POST {path}"}
    assert sent[0][-1][1]["x-test"] == "1"
    # What was compared is what was meant: history, tools and settings were in the body.
    assert len(plain[-1]["messages"]) == 4
    assert [t["function"]["name"] for t in plain[-1]["tools"]] == ["_lookup"]
    assert plain[-1]["temperature"] == 0.25
    assert plain[-1]["stop"] == ["END"]
    assert (plain[-1]["top_p"], plain[-1]["custom"]) == (0.75, {"a": [1]})
    assert plain[-1].get("stream", False) is stream
    if sdk_name == "openai":  # pydantic-ai asks Groq for no usage chunk
        assert ("stream_options" in plain[-1]) is stream


@pytest.mark.parametrize("sdk_name", list(SDKS))
async def test_a_plain_body_client_keeps_the_request_options_of_create(sdk_name: str) -> None:
    """``create``'s request options reach the SDK's own request as they did through its
    ``create``: a query string, and a timeout that ends a held answer (with retries off, as
    the SDK's APITimeoutError)."""
    _, our_class, _ = SDKS[sdk_name]
    async with running_fake_openai() as fake:
        base = f"http://127.0.0.1:{fake.port}" + ("/v1" if sdk_name == "openai" else "")
        async with our_class(base_url=base, api_key="k", max_retries=0) as sdk:
            messages = [{"role": "user", "content": "hi"}]
            await sdk.chat.completions.create(model="m", messages=messages, extra_query={"q": "1"})
            assert fake.targets[-1].endswith("/chat/completions?q=1")
            timeout_error = importlib.import_module(sdk_name).APITimeoutError
            with pytest.raises(timeout_error):
                await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "HOLD"}], timeout=0.2
                )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (PlainBodyOpenAI, AsyncOpenAI),
        (PlainBodyGroq, AsyncGroq),
        (ValidatingAnthropic, AsyncAnthropic),
    ],
)
async def test_a_client_prepares_each_path_once_and_again_for_a_new_base_url(
    ours: type[Any], theirs: type[Any]
) -> None:
    """Our clients keep the URL they prepared per path (agents/urls.py): the SDK's own URL,
    the same object the next time, and a new one after the base URL is replaced."""
    ours_client = ours(base_url="http://127.0.0.1:1/v1", api_key="k")
    theirs_client = theirs(base_url="http://127.0.0.1:1/v1", api_key="k")
    path = "/chat/completions?beta=true"
    first = ours_client._prepare_url(path)
    assert first == theirs_client._prepare_url(path)
    assert ours_client._prepare_url(path) is first
    ours_client.base_url = theirs_client.base_url = "http://127.0.0.1:2/v2"
    moved = ours_client._prepare_url(path)
    assert moved == theirs_client._prepare_url(path)
    assert str(moved).startswith("http://127.0.0.1:2/v2/")
    # A path per request (a file id) is prepared each time once a few are kept.
    for n in range(40):
        assert ours_client._prepare_url(f"/files/{n}") == theirs_client._prepare_url(f"/files/{n}")
    assert ours_client._prepare_url("/files/39") is not ours_client._prepare_url("/files/39")
    assert ours_client._prepare_url(path) is moved
    await ours_client.close()
    await theirs_client.close()


def _completion(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    base = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "m",
        "choices": [{**choice, **fields.pop("choice", {})}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
    return {**base, **fields}


def _chunk(delta: dict[str, Any], finish: str | None = None, **fields: Any) -> dict[str, Any]:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return {**base, "choices": choices, **fields}


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LOOKUP_SCHEMA = {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}
_TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "_lookup", "arguments": '{"key": "a"}'},
}
# Raw answers, each with the SDKs whose class validates it (the others build it their way).
_BOTH = frozenset({"openai", "groq"})
_ANSWERS: dict[str, tuple[Any, frozenset[str]]] = {
    "text": (_completion({"role": "assistant", "content": "hello"}), _BOTH),
    "tool call": (
        _completion(
            {"role": "assistant", "content": None, "tool_calls": [_TOOL_CALL]},
            choice={"finish_reason": "tool_calls"},
        ),
        _BOTH,
    ),
    "extras": (
        _completion(
            {"role": "assistant", "content": "hi", "reasoning_content": "so", "extra": [1]},
            service_tier="default",
            system_fingerprint="fp",
            x_provider={"region": "eu"},
        ),
        # Groq's SDK knows other service tiers.
        frozenset({"openai"}),
    ),
    # What OpenAI-compatible servers send and pydantic-ai accepts: no `created` (OpenRouter),
    # no finish reason (Ollama), an unknown service tier, text in content parts.
    "lenient": (
        _completion(
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            created=None,
            service_tier="standard",
            choice={"finish_reason": None},
        ),
        frozenset(),
    ),
    "streamed": (
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"content": "hel"}),
            _chunk({"tool_calls": [{"index": 0, **_TOOL_CALL}]}),
            _chunk({}, "tool_calls"),
            _chunk(
                {},
                choices=[],
                usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            ),
        ],
        _BOTH,
    ),
    "streamed, lenient": (
        [_chunk({"content": "a"}, created=None), _chunk({}, "eos", service_tier="standard")],
        frozenset(),
    ),
}


def _anthropic_model(client_class: type[AsyncAnthropic], port: int) -> tuple[Model, Any]:
    sdk = client_class(base_url=f"http://127.0.0.1:{port}", api_key="k")
    return AnthropicModel("claude-x", provider=AnthropicProvider(anthropic_client=sdk)), sdk


_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "hello"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 2},
}
_TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "_lookup", "input": {"key": "a"}}


def _events(*, stop_reason: str = "end_turn") -> list[Any]:
    start = {**_MESSAGE, "content": [], "stop_reason": None}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hel"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]


_ANTHROPIC_ANSWERS: dict[str, tuple[Any, frozenset[str]]] = {
    "text": (_MESSAGE, frozenset({"anthropic"})),
    "tool use": (
        {**_MESSAGE, "content": [_TOOL_USE], "stop_reason": "tool_use"},
        frozenset({"anthropic"}),
    ),
    "extras": ({**_MESSAGE, "x_provider": {"region": "eu"}}, frozenset({"anthropic"})),
    # A stop reason or a delta newer than this SDK: built its way, as before.
    "lenient": ({**_MESSAGE, "stop_reason": "new_reason"}, frozenset()),
    "streamed": (_events(), frozenset({"anthropic"})),
    "streamed, lenient": (_events(stop_reason="new_reason"), frozenset()),
}
_CASES = [(sdk, answer) for sdk in ("openai", "groq") for answer in _ANSWERS] + [
    ("anthropic", answer) for answer in _ANTHROPIC_ANSWERS
]
# Per SDK: its own client class, ours, and how to build a pydantic-ai model on either.
_VALIDATING: dict[str, tuple[Any, Any, Any]] = {
    **SDKS,
    "anthropic": (AsyncAnthropic, ValidatingAnthropic, _anthropic_model),
}


@pytest.mark.parametrize(("sdk_name", "answer"), _CASES)
async def test_our_clients_validate_answers_into_what_the_sdks_own_clients_build(
    sdk_name: str, answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PlainBodyOpenAI``, ``PlainBodyGroq`` and ``ValidatingAnthropic`` validate a response
    or stream item instead of building it with the SDK's ``construct_type``
    (agents/validation.py), and fall back to it for what does not validate: pydantic-ai makes
    the same response (or error) of either client's, for valid answers and for the lenient
    ones of OpenAI-compatible servers."""
    raw, valid_for = (_ANTHROPIC_ANSWERS if sdk_name == "anthropic" else _ANSWERS)[answer]
    streamed = isinstance(raw, list)
    built: list[type] = []
    construct = importlib.import_module(f"{sdk_name}._base_client").construct_type

    def counting(*, type_: type, value: object) -> object:
        built.append(type_)
        return construct(type_=type_, value=value)

    monkeypatch.setattr(f"{sdk_name}._base_client.construct_type", counting)
    outcomes, built_by = [], []
    async with running_fake_openai() as fake:
        for client_class in _VALIDATING[sdk_name][:2]:
            built.clear()
            model, sdk = _VALIDATING[sdk_name][2](client_class, fake.port)
            fake.scripted.append(raw)
            outcomes.append(await _outcome(model, streamed))
            await sdk.close()
            built_by.append(list(built))
    (theirs, ours), (their_builds, our_builds) = outcomes, built_by
    assert ours == theirs
    assert their_builds, "the SDK's own client builds every answer with construct_type"
    assert (our_builds == []) is (sdk_name in valid_for)
    if sdk_name in valid_for:  # what was compared is what was meant
        assert ours[-1].parts


async def _outcome(model: Model, streamed: bool) -> tuple[Any, ...]:
    """What pydantic-ai makes of one answer: the response (and the streamed events), or the
    error it raised."""
    parameters = ModelRequestParameters(
        function_tools=[ToolDefinition(name="_lookup", parameters_json_schema=_LOOKUP_SCHEMA)]
    )
    messages = [ModelRequest.user_text_prompt("hi")]
    try:
        if not streamed:
            response = await model_request(model, messages, model_request_parameters=parameters)
            return (replace(response, timestamp=EPOCH),)
        async with model_request_stream(
            model, messages, model_request_parameters=parameters
        ) as stream:
            events = [event async for event in stream]
        return (events, replace(stream.get(), timestamp=EPOCH))
    except Exception as error:  # the error is the outcome compared
        return (type(error), str(error))


@pytest.mark.allow_blocking
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("threadline:echo", {"started": [], "answered": [], "stopped": []}),
        # Imported while the app starts, before it is ready: never on a request's way.
        (
            "openai-compat:m@http://127.0.0.1:9/v1",
            {"started": ["groq", "openai"], "stopped": ["groq", "openai"]},
        ),
    ],
)
def test_provider_sdks_are_imported_only_for_a_model_that_needs_them(
    tmp_path: Any, model: str, expected: dict[str, list[str]]
) -> None:
    """The OpenAI and Groq SDKs were a quarter of every process's start-up imports."""
    database = f"sqlite:///{tmp_path}/sdks.db"
    seen = modules_an_app_loads(database, model, ("openai", "groq", "anthropic"))
    tops = {when: sorted({m.partition(".")[0] for m in names}) for when, names in seen.items()}
    assert tops == expected
