"""Agent definitions are built once and shared; per-run state never leaks between requests."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from pydantic_ai import RunContext

from tests.apps import AppFactory, services
from threadline.agents import AgentRegistry, AgentSpec, RunDeps
from threadline.agents.echo import echo_model
from threadline.errors import AgentUnavailable, ConfigError


async def test_200_concurrent_first_requests_initialise_once() -> None:
    gate = asyncio.Event()
    setups = 0

    async def setup() -> None:
        nonlocal setups
        setups += 1
        await gate.wait()  # hold the first initialisation open while the others pile up

    registry = AgentRegistry(
        [AgentSpec(name="slow", model="threadline:echo", setup=setup)],
        default_model="threadline:echo",
    )
    tasks = [asyncio.create_task(registry.get("slow")) for _ in range(200)]
    await asyncio.sleep(0)  # let every task reach the lock
    gate.set()
    loaded = await asyncio.gather(*tasks)
    assert setups == 1
    assert registry.init_count == 1
    assert len({id(item.agent) for item in loaded}) == 1


async def test_setup_runs_once_at_start_up_not_per_request(make_app: AppFactory) -> None:
    setups = 0

    async def setup() -> None:
        nonlocal setups
        setups += 1

    spec = AgentSpec(name="slow", model="threadline:echo", setup=setup)
    async with make_app(agents=[spec]) as (client, _):
        assert setups == 1  # before the first request
        responses = await asyncio.gather(
            *(
                client.post("/api/v1/agent/slow/run", json={"message_content": f"m{i}"})
                for i in range(200)
            )
        )
    assert [r.status_code for r in responses] == [200] * 200
    assert setups == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_failing_lazy_setup_is_unavailable_and_retried_only_after_a_back_off() -> None:
    calls = 0

    async def setup() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("vector index at postgres://admin:hunter2@db is unreachable")

    clock = Clock()
    registry = AgentRegistry(
        [AgentSpec(name="flaky", model="threadline:echo", setup=setup)],
        default_model="threadline:echo",
        retry_after_s=5,
        clock=clock,
    )
    with pytest.raises(AgentUnavailable) as first:
        await registry.get("flaky")
    assert first.value.retry_after_s == 5
    assert "hunter2" not in str(first.value)
    clock.now += 3
    with pytest.raises(AgentUnavailable) as again:
        await registry.get("flaky")
    assert again.value.retry_after_s == 2
    assert calls == 1  # remembered, not rerun
    clock.now += 2
    loaded = await registry.get("flaky")
    assert calls == 2
    assert loaded is await registry.get("flaky")


async def test_a_lazy_setup_failing_at_run_time_is_503_and_stores_nothing(
    make_app: AppFactory,
) -> None:
    healthy = True

    async def setup() -> None:
        if not healthy:
            raise RuntimeError("secret-dsn unreachable")

    user = f"u-{uuid.uuid4()}"
    spec = AgentSpec(name="flaky", model="threadline:echo", setup=setup)
    async with make_app(agents=[spec]) as (client, app):
        registry = services(app).registry
        # Start-up loaded it; forget it, as a registry used lazily would not have it yet.
        registry._loaded.pop("flaky")
        inits = registry.init_count
        healthy = False
        body = {"message_content": "hi", "user_id": user, "session_name": "s"}
        for _ in range(2):
            r = await client.post("/api/v1/agent/flaky/run", json=body)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "agent_unavailable"
            assert "secret-dsn" not in r.text
            assert 1 <= int(r.headers["retry-after"]) <= 5
        _, total = await services(app).store.list_sessions(user_id=user)
        assert total == 0
        assert registry.init_count == inits + 1  # one failed attempt, not one per request


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("openai:gpt-4o", "agent 'bad': model 'openai:gpt-4o' needs OPENAI_API_KEY"),
        ("openai-compat:llama3", "agent 'bad': expected openai-compat:MODEL@BASE_URL"),
        ("openai-compat:m@http://h/v1#", "agent 'bad': expected openai-compat:MODEL@BASE_URL"),
        ("openai-compat:m@http://h/v1#A-B", "agent 'bad': expected openai-compat:MODEL@BASE_URL"),
        (
            "openai-compat:m@http://h/v1#TL_UNSET_KEY",
            "agent 'bad': model endpoint 'http://h/v1' needs TL_UNSET_KEY",
        ),
        ("nope:x", "agent 'bad': cannot use model 'nope:x'"),
    ],
)
async def test_a_model_that_cannot_be_built_fails_start_up(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, model: str, message: str
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("TL_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError) as failed:
        async with make_app(agents=[AgentSpec(name="bad", model=model)]):
            pass
    assert str(failed.value).startswith(message)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_default_model_is_checked_for_agents_that_use_it(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="agent 'assistant': model 'anthropic:claude-x'"):
        async with make_app(model="anthropic:claude-x"):
            pass


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_failing_setup_fails_start_up(make_app: AppFactory) -> None:
    async def setup() -> None:
        raise RuntimeError("index missing")

    with pytest.raises(ConfigError) as failed:
        async with make_app(agents=[AgentSpec(name="broken", setup=setup)]):
            pass
    assert str(failed.value) == "agent 'broken': setup failed: RuntimeError('index missing')"


def _whose(ctx: RunContext[RunDeps], key: str) -> str:
    """Echo back a context value and the run it came from."""
    return json.dumps({"value": ctx.deps.context.get(key), "run": str(ctx.deps.run_id)})


async def test_concurrent_requests_never_see_each_others_context(make_app: AppFactory) -> None:
    # A shared barrier makes every run sit inside its tool call at the same moment, so a
    # leak through shared state would show up as a mismatched value.
    arrived = 0
    everyone = asyncio.Event()
    count = 30

    async def whose(ctx: RunContext[RunDeps], key: str) -> str:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            everyone.set()
        await everyone.wait()
        return _whose(ctx, key)

    spec = AgentSpec(name="ctx", model=echo_model(), tools=(whose,))
    # Pinned: the barrier needs all 30 runs in flight at once, and the adaptive limit may
    # shrink below that on a loaded machine (then the barrier never opens).
    async with make_app(agents=[spec], max_concurrent_runs=count) as (client, _):
        secrets = [str(uuid.uuid4()) for _ in range(count)]
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/agent/ctx/run",
                    json={
                        "message_content": '/call whose {"key": "secret"}',
                        "context": {"secret": s},
                    },
                )
                for s in secrets
            )
        )
    for secret, response in zip(secrets, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        seen = json.loads(body["tool_outputs"][0]["content"])
        assert seen == {"value": secret, "run": body["run_id"]}
