"""The real pydantic-ai OpenAI client against a fake OpenAI-compatible server: replies,
streamed replies, and a cancel that closes the provider's request."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.apps import AppFactory, services
from tests.fake_openai import running_fake_openai
from threadline.agents import AgentSpec


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_openai_compatible_provider_path(make_app: AppFactory) -> None:
    async with running_fake_openai() as fake:
        spec = AgentSpec(
            name="remote",
            instructions="Be brief.",
            model=f"openai-compat:fake-model@{fake.base_url}",
        )
        async with make_app(agents=[spec]) as (client, _):
            first = await client.post("/api/v1/agent/remote/run", json={"message_content": "hi"})
            assert first.status_code == 200, first.text
            assert first.json()["message"] == "fake: hi"
            assert first.json()["usage"]["input_tokens"] == 7
            second = await client.post(
                "/api/v1/agent/remote/run",
                json={"message_content": "again", "session_id": first.json()["session_id"]},
            )
            assert second.json()["message"] == "fake: again"
    sent = fake.requests[-1]
    assert sent["model"] == "fake-model"
    roles = [(m["role"], m.get("content")) for m in sent["messages"]]
    assert roles == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "fake: hi"),
        ("user", "again"),
    ]


async def ask(make_app: AppFactory, model: str) -> dict[str, str]:
    """The headers the fake endpoint saw for one run of an agent on ``model``."""
    async with running_fake_openai() as fake:
        spec = AgentSpec(name="remote", model=model.replace("URL", fake.base_url))
        async with make_app(agents=[spec]) as (client, _):
            reply = await client.post("/api/v1/agent/remote/run", json={"message_content": "hi"})
            assert reply.status_code == 200, reply.text
            assert reply.json()["message"] == "fake: hi"
    [headers] = fake.headers
    return headers


@pytest.fixture
def openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's own credentials in the environment, as on a machine that also uses OpenAI."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-openai")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-openai")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-secret")


def sent_secrets(headers: dict[str, str]) -> list[str]:
    return [v for v in headers.values() if "openai" in v or "secret" in v]


@pytest.mark.usefixtures("openai_environment")
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_compatible_endpoint_gets_no_key_by_default(make_app: AppFactory) -> None:
    headers = await ask(make_app, "openai-compat:fake-model@URL")
    assert "authorization" not in headers
    assert "openai-organization" not in headers
    assert "openai-project" not in headers
    assert sent_secrets(headers) == []


@pytest.mark.usefixtures("openai_environment")
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_compatible_endpoint_gets_only_the_key_its_model_string_names(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENDPOINT_KEY", "sk-endpoint")
    headers = await ask(make_app, "openai-compat:fake-model@URL#FAKE_ENDPOINT_KEY")
    assert headers["authorization"] == "Bearer sk-endpoint"
    assert "openai-organization" not in headers
    assert sent_secrets(headers) == []


async def read_events(client: httpx.AsyncClient, url: str, **kwargs: Any) -> list[Event]:
    """Every event of one SSE response, its ``data`` parsed."""
    async with aconnect_sse(client, "POST", url, **kwargs) as source:
        assert source.response.status_code == 200, await source.response.aread()
        return [Event(sse.event, sse.id, sse.json()) async for sse in source.aiter_sse()]


@dataclass(frozen=True)
class Event:
    kind: str
    id: str
    data: dict[str, Any]


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_a_streamed_reply_comes_in_the_providers_own_chunks(make_app: AppFactory) -> None:
    async with running_fake_openai() as fake:
        spec = AgentSpec(name="remote", model=f"openai-compat:fake-model@{fake.base_url}")
        async with make_app(agents=[spec]) as (client, _):
            body = {"message_content": "one two three four", "stream": True}
            events = await read_events(client, "/api/v1/agent/remote/run", json=body)
    assert fake.requests[-1]["stream"] is True  # the provider really streamed
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["message.accepted", "run.started"], kinds
    assert kinds[-1] == "run.completed", kinds
    deltas = [e.data["delta"] for e in events if e.kind == "text.delta"]
    final = events[-1].data
    assert final["message"] == "fake: one two three four"
    # One delta per chunk the fake sent ("fake: " and one per word), in order.
    assert deltas == ["fake: ", "one ", "two ", "three ", "four"]
    assert "".join(deltas) == final["message"]
    assert final["message_ids"] == [events[0].data["message_id"]]
    assert final["usage"]["input_tokens"] == 7
    assert set(kinds[2:-1]) == {"text.delta"}, kinds
    assert {e.data["run_id"] for e in events[1:]} == {final["run_id"]}


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_cancelling_a_streamed_run_closes_the_provider_request(
    make_app: AppFactory,
) -> None:
    async with running_fake_openai() as fake:
        spec = AgentSpec(name="remote", model=f"openai-compat:fake-model@{fake.base_url}")
        async with make_app(agents=[spec]) as (client, app):
            store = services(app).store
            sid = (await store.create_session("remote", user_id=f"u-{uuid.uuid4()}")).id
            body = {"message_content": "HOLD", "session_id": str(sid), "stream": True}
            streaming = asyncio.create_task(
                read_events(client, "/api/v1/agent/remote/run", json=body)
            )
            async with services(app).coordinator.events.watch(sid, after="0") as watch:
                # The provider's first chunk has reached the run, and the provider holds.
                while (event := await watch.next()) is None or event.kind != "text.delta":
                    pass
            await fake.held.wait()
            runs = (await client.get(f"/api/v1/sessions/{sid}/runs")).json()["runs"]
            assert [r["status"] for r in runs] == ["running"]
            cancelled = await client.post(f"/api/v1/runs/{runs[0]['id']}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["status"] == "cancelled"
            assert cancelled.json()["error_code"] == "run_cancelled"
            await fake.disconnected.wait()  # the provider's HTTP request was closed
            events = await streaming
            messages = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
    assert fake.requests[-1]["stream"] is True
    kinds = [e.kind for e in events]
    assert kinds == ["message.accepted", "run.started", "text.delta", "run.failed"], kinds
    assert events[2].data["delta"] == "fake: "
    failed = events[-1].data
    assert failed["run_id"] == runs[0]["id"]
    assert failed["error"]["code"] == "run_cancelled"
    assert failed["message_ids"] == [events[0].data["message_id"]]
    assert [m["role"] for m in messages] == ["user"]
