"""``/v1/models`` and ``/v1/chat/completions`` driven by the official ``openai`` SDK (sync,
async and streaming) against a real ``threadline serve`` process, on SQLite and PostgreSQL.

The echo model answers ``echo: <prompt>``, so every reply says which messages its run saw.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import service_url
from tests.serving import serving

pytestmark = pytest.mark.allow_blocking  # the sync SDK client blocks, by design
ECHO_DELAY_MS = 400


# One server per store for the module: every test works in sessions of its own.
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("openai")
    if request.param == "postgres":
        database = service_url("THREADLINE_TEST_DATABASE_URL")
    else:
        database = f"sqlite:///{tmp_path}/openai.db"
    with serving(
        tmp_path / "server.log",
        THREADLINE_DATABASE_URL=database,
        THREADLINE_ECHO_DELAY_MS=str(ECHO_DELAY_MS),
        THREADLINE_DEBUG_METRICS="true",
    ) as url:
        yield url


MakeClient = Callable[..., OpenAI]


@pytest.fixture
def client() -> Iterator[MakeClient]:
    """``client(server, **options)``: the official sync client of ``server``, closed after the
    test (an unclosed one leaves its sockets to the garbage collector)."""
    opened: list[OpenAI] = []

    def make(server: str, **options: Any) -> OpenAI:
        options = {"api_key": "unused", "max_retries": 0, **options}
        opened.append(OpenAI(base_url=f"{server}/v1", **options))
        return opened[-1]

    yield make
    for sdk in opened:
        sdk.close()


def history(server: str, session_id: str) -> list[tuple[str, str]]:
    body = httpx.get(f"{server}/api/v1/sessions/{session_id}").json()
    return [(m["role"], m["content"]) for m in body["messages"]]


def user_turn(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_models_are_the_agents(server: str, client: MakeClient) -> None:
    models = client(server).models.list()
    assert {"echo", "assistant"} <= {m.id for m in models}
    assert client(server).models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("nobody")


def test_a_completion_continues_the_users_session_on_the_server(
    server: str, client: MakeClient
) -> None:
    user = f"u-{uuid.uuid4()}"
    sdk = client(server)
    raw = sdk.chat.completions.with_raw_response.create(
        model="echo",
        messages=[{"role": "system", "content": "be brief"}, *user_turn("hello")],
        user=user,
    )
    first = raw.parse()
    session_id = raw.headers["x-session-id"]
    # The client sends only its new message; the server keeps the conversation.
    second = sdk.chat.completions.create(model="echo", messages=user_turn("again"), user=user)

    assert first.choices[0].message.content == "echo: hello"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.choices[0].message.content == "echo: again"
    assert (second.metadata or {})["session_id"] == session_id
    assert history(server, session_id) == [
        ("user", "hello"),
        ("assistant", "echo: hello"),
        ("user", "again"),
        ("assistant", "echo: again"),
    ]


def test_a_new_session_takes_the_conversation_the_client_brought(
    server: str, client: MakeClient
) -> None:
    sdk = client(server)
    brought = [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "hello Ada"},
        {"role": "user", "content": [{"type": "text", "text": "what is my name?"}]},
    ]
    raw = sdk.chat.completions.with_raw_response.create(model="echo", messages=brought)
    session_id = raw.headers["x-session-id"]
    # Named by the header, the session's own history wins over what the client sends.
    again = sdk.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "forget that"}, *user_turn("and now?")],
        extra_headers={"X-Session-Id": session_id},
    )

    assert raw.parse().choices[0].message.content == "echo: what is my name?"
    assert again.choices[0].message.content == "echo: and now?"
    assert history(server, session_id) == [
        ("user", "my name is Ada"),
        ("assistant", "hello Ada"),
        ("user", "what is my name?"),
        ("assistant", "echo: what is my name?"),
        ("user", "and now?"),
        ("assistant", "echo: and now?"),
    ]


def test_a_streamed_completion_comes_in_chunks_with_usage(server: str, client: MakeClient) -> None:
    sdk = client(server)
    stream = sdk.chat.completions.create(
        model="echo",
        messages=user_turn("one two three four"),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Session-Id": f"chat-{uuid.uuid4()}"},
    )
    chunks = list(stream)

    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert "".join(deltas) == "echo: one two three four"
    assert len(deltas) > 1
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


async def test_a_burst_of_three_through_the_sdk_is_answered_by_one_model_call(
    server: str,
) -> None:
    sdk = AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    session = f"burst-{uuid.uuid4()}"
    headers = {"X-Session-Id": session}

    async def send(text: str) -> Any:
        return await sdk.chat.completions.create(
            model="echo", messages=user_turn(text), extra_headers=headers
        )

    async with httpx.AsyncClient(base_url=server) as http:
        before = (await http.get("/debug/metrics")).json()["model_calls"]["completed"]
        first = asyncio.create_task(send("first"))
        # The first message's run is under way (its model call is sleeping) before the rest.
        while not (await http.get(f"/api/v1/sessions/{session}/runs")).json().get("runs"):
            await asyncio.sleep(0.01)  # polls the server; the test's timeout bounds it
        rest = [asyncio.create_task(send(t)) for t in ("second", "third")]
        replies = await asyncio.gather(first, *rest)
        after = (await http.get("/debug/metrics")).json()["model_calls"]["completed"]
        runs = (await http.get(f"/api/v1/sessions/{session}/runs")).json()["runs"]
    await sdk.close()

    texts = {r.choices[0].message.content for r in replies}
    assert len(texts) == 1
    text = texts.pop()
    assert all(word in text for word in ("first", "second", "third"))
    assert after - before == 1
    succeeded = [r for r in runs if r["status"] == "succeeded"]
    assert len(succeeded) == 1
    assert len(succeeded[0]["message_ids"]) == 3
    notes = [r.metadata or {} for r in replies]
    assert {n["merged"] for n in notes} == {"true"}
    assert {len(n["message_ids"].split(",")) for n in notes} == {3}


def test_errors_come_in_openais_shape(server: str, client: MakeClient) -> None:
    sdk = client(server)
    with pytest.raises(openai.BadRequestError) as unsupported:
        sdk.chat.completions.create(model="echo", messages=user_turn("x"), temperature=0.2)
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="nobody", messages=user_turn("x"))
    with pytest.raises(openai.BadRequestError) as not_last:
        sdk.chat.completions.create(
            model="echo", messages=[{"role": "assistant", "content": "I spoke last"}]
        )
    raw = httpx.post(f"{server}/v1/chat/completions", json={"model": "echo"})

    assert unsupported.value.code == "unsupported_parameter"
    assert unsupported.value.param == "temperature"
    assert unknown.value.code == "agent_not_found"
    assert not_last.value.code == "invalid_input"
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["type"] == "invalid_request_error"


def test_the_api_key_goes_as_a_bearer_token(tmp_path: Path, client: MakeClient) -> None:
    with serving(
        tmp_path / "server.log",
        THREADLINE_DATABASE_URL=f"sqlite:///{tmp_path}/key.db",
        THREADLINE_API_KEY="s3cret",
    ) as url:
        reply = client(url, api_key="s3cret").chat.completions.create(
            model="echo", messages=user_turn("hi")
        )
        wrong = client(url, api_key="nope")
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
    assert reply.choices[0].message.content == "echo: hi"
    assert refused.value.status_code == 401
    assert refused.value.body is not None
