"""Agent definitions are built once and shared; per-run state never leaks between requests."""

from __future__ import annotations

import asyncio
import json
import uuid

from pydantic_ai import RunContext

from tests.apps import AppFactory, services
from threadline.agents import AgentRegistry, AgentSpec, RunDeps
from threadline.agents.echo import echo_model


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


async def test_200_concurrent_first_http_requests_initialise_once(
    make_app: AppFactory,
) -> None:
    gate = asyncio.Event()
    setups = 0

    async def setup() -> None:
        nonlocal setups
        setups += 1
        await gate.wait()

    spec = AgentSpec(name="slow", model="threadline:echo", setup=setup)
    async with make_app(agents=[spec]) as (client, app):
        posts = [
            asyncio.create_task(
                client.post("/api/v1/agent/slow/run", json={"message_content": f"m{i}"})
            )
            for i in range(200)
        ]
        while services(app).registry.init_count == 0:
            await asyncio.sleep(0)
        gate.set()
        responses = await asyncio.gather(*posts)
    assert [r.status_code for r in responses] == [200] * 200
    assert setups == 1


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
    async with make_app(agents=[spec]) as (client, _):
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
