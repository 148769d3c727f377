"""The real pydantic-ai OpenAI client against a fake OpenAI-compatible server."""

from __future__ import annotations

import pytest

from tests.apps import AppFactory
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
