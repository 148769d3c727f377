"""The intake bound (``INTAKE_CONCURRENCY``, api/intake.py) through a real server process.

The server lets one request at a time take its first step. A request that then waits for its
reply, a stream, a background submit and the OpenAI-compatible routes must hold no slot while
they wait: otherwise the next request would wait for the first one's reply, and here, with
every model call held at the test's gate, it would wait forever. The gate sees each model call
start, so the tests know without timing that a request got through intake.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from httpx_sse import aconnect_sse
from openai import AsyncOpenAI

from tests.multiprocess.conftest import (
    Gate,
    GateCall,
    MakeSession,
    Server,
    post,
    running_servers,
    server_env,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres]

AGENT = "gated"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(pg_dsn: str, redis_dsn: str, workdir: Path) -> AsyncIterator[Server]:
    env = server_env(pg_dsn, redis_dsn, intake_concurrency=1)
    del env["THREADLINE_REDIS_URL"]  # one process: the in-process coordinator
    async with running_servers(1, env, workdir, "intake") as started:
        yield started[0]


async def held(gate: Gate, text: str) -> GateCall:
    """The next model call, which must be the one for ``text``."""
    call = await gate.next()
    assert text in call.prompt, call.prompt
    return call


async def test_a_request_waiting_for_its_reply_holds_no_intake_slot(
    server: Server, gate: Gate, make_session: MakeSession
) -> None:
    first, second = await make_session(AGENT), await make_session(AGENT)
    async with httpx.AsyncClient(timeout=60) as client:
        one = post(client, server, first.id, f"{gate.line()}\nfirst", agent=AGENT)
        call_one = await held(gate, "first")
        # The first request waits for its reply; the second gets through intake regardless.
        two = post(client, server, second.id, f"{gate.line()}\nsecond", agent=AGENT)
        call_two = await held(gate, "second")
        assert not one.done()
        call_two.release()
        call_one.release()
        replies = [(await one).json(), (await two).json()]
    assert [r["message"].splitlines()[-1] for r in replies] == ["first", "second"]


async def test_streams_background_and_openai_routes_hold_no_intake_slot(
    server: Server, gate: Gate, make_session: MakeSession
) -> None:
    streamed, background = await make_session("streamed"), await make_session(AGENT)
    url = f"{server.url}/api/v1/agent/{AGENT}/run"
    sdk = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    calls: list[GateCall] = []
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"message_content": f"{gate.line()}\nstreamed", "session_id": str(streamed.id)}
        streaming = {**body, "stream": True}
        stream_url = f"{server.url}/api/v1/agent/streamed/run"
        async with aconnect_sse(client, "POST", stream_url, json=streaming) as source:
            assert source.response.status_code == 200
            calls.append(await held(gate, "streamed"))

            body = {"message_content": f"{gate.line()}\nbackground", "background": True}
            accepted = await client.post(url, json={**body, "session_id": str(background.id)})
            assert accepted.status_code == 202, accepted.text
            calls.append(await held(gate, "background"))

            chat = asyncio.create_task(
                sdk.chat.completions.create(
                    model=AGENT,
                    messages=[{"role": "user", "content": f"{gate.line()}\nchat"}],
                    extra_headers={"X-Session-Id": f"intake-chat-{uuid.uuid4()}"},
                )
            )
            calls.append(await held(gate, "chat"))
            response = asyncio.create_task(
                sdk.responses.create(model=AGENT, input=f"{gate.line()}\nresponses")
            )
            calls.append(await held(gate, "responses"))
            # Four model calls held at once: no request kept its intake slot while waiting.
            assert not chat.done()
            assert not response.done()
            for call in calls:
                call.release()
            events = [sse.event async for sse in source.aiter_sse()]
        assert events[-1] == "run.completed", events
        completion, answered = await chat, await response
    await sdk.close()
    assert completion.choices[0].message.content is not None
    assert completion.choices[0].message.content.endswith("chat")
    assert answered.output_text.endswith("responses")
