"""The per-session queue through the HTTP API, on both stores.

Ordering is controlled by the test models (``tests/models.py``): a run completes only when its
prompt holds the messages the test expects, or when the test releases it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.apps import AppFactory, services
from tests.fake_openai import running_fake_openai
from tests.models import GatedModel, ToolThenHangModel
from threadline.agents import AgentSpec

RUN = "/api/v1/agent/gated/run"


async def wait_until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition on the store; the test's timeout bounds it."""
    while not await predicate():
        await asyncio.sleep(0.005)


async def unanswered(app: FastAPI, session_id: uuid.UUID) -> int:
    return len(await services(app).store.unanswered(session_id))


async def new_session(app: FastAPI, agent: str = "gated") -> uuid.UUID:
    return (await services(app).store.create_session(agent, user_id=f"u-{uuid.uuid4()}")).id


def post(client: httpx.AsyncClient, session_id: uuid.UUID, text: str, **extra: Any) -> Any:
    body = {"message_content": text, "session_id": str(session_id), **extra}
    return asyncio.create_task(client.post(RUN, json=body))


@pytest.mark.parametrize("burst", [2, 3, 10])
async def test_a_burst_is_answered_once_with_every_message(
    make_app: AppFactory, burst: int
) -> None:
    texts = [f"part {i} of the thought" for i in range(burst)]
    model = GatedModel(expect=tuple(texts))
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        responses = await asyncio.gather(*(post(client, sid, t) for t in texts))
        bodies = [r.json() for r in responses]
        assert [r.status_code for r in responses] == [200] * burst, bodies
        assert model.completed == 1
        assert model.started == model.completed + model.cancelled
        assert len({b["run_id"] for b in bodies}) == 1
        assert len({b["message"] for b in bodies}) == 1

        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        users = [m for m in history if m["role"] == "user"]
        replies = [m for m in history if m["role"] == "assistant"]
        assert sorted(m["content"] for m in users) == sorted(texts)
        assert [m["seq"] for m in history] == list(range(1, burst + 2))
        assert len(replies) == 1
        assert history[-1] == replies[0]
        # The one prompt is every message in seq order, and every caller got that reply.
        assert replies[0]["content"] == "echo: " + "\n---\n".join(m["content"] for m in users)
        assert bodies[0]["message"] == replies[0]["content"]
        assert all(b["message_ids"] == [m["id"] for m in users] for b in bodies)
        run = (await client.get(f"/api/v1/runs/{bodies[0]['run_id']}")).json()
        assert run["status"] == "succeeded"
        assert run["message_ids"] == [m["id"] for m in users]
        assert services(app).coordinator.metrics()["sessions_in_memory"] == 0


async def test_message_after_commit_starts_a_new_run_that_sees_the_reply(
    make_app: AppFactory,
) -> None:
    model = GatedModel()
    model.release.set()
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        first = (await post(client, sid, "first")).json()
        second = (await post(client, sid, "second")).json()
        assert first["run_id"] != second["run_id"]
        assert second["message"] == "echo: second"
        seen = [type(m).__name__ for m in model.histories[-1]]
        assert seen == ["ModelRequest", "ModelResponse", "ModelRequest"]


async def test_enqueue_answers_each_message_in_order(make_app: AppFactory) -> None:
    model = GatedModel()
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "m0", strategy="enqueue")
        await model.called.wait()
        rest = [post(client, sid, f"m{i}", strategy="enqueue") for i in range(1, 5)]
        await wait_until(lambda: _has(app, sid, 5))
        model.release.set()
        bodies = [r.json() for r in await asyncio.gather(first, *rest)]
        assert [b["message"] for b in bodies] == [f"echo: m{i}" for i in range(5)]
        assert len({b["run_id"] for b in bodies}) == 5
        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        arrival = [m["content"] for m in history if m["role"] == "user"]
        assert arrival[0] == "m0"
        # FIFO: runs answer in the order messages were stored (seq), one message each.
        assert model.prompts == arrival
        replies = [m["content"] for m in history if m["role"] == "assistant"]
        assert replies == [f"echo: {text}" for text in arrival]


async def _has(app: FastAPI, sid: uuid.UUID, count: int) -> bool:
    return await unanswered(app, sid) >= count


async def test_reject_gets_409_with_the_busy_run_and_stores_nothing(
    make_app: AppFactory,
) -> None:
    model = GatedModel()
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "working on it")
        await model.called.wait()
        busy = await client.post(
            RUN, json={"message_content": "hello?", "session_id": str(sid), "strategy": "reject"}
        )
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["code"] == "session_busy"
        assert await unanswered(app, sid) == 1
        model.release.set()
        done = (await first).json()
        assert busy.json()["error"]["run_id"] == done["run_id"]
        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        assert [m["content"] for m in history] == ["working on it", "echo: working on it"]


async def test_queue_cap_gets_429_with_retry_after(make_app: AppFactory) -> None:
    model = GatedModel()
    spec = AgentSpec(name="gated", model=model.model())
    async with make_app(agents=[spec], session_queue_max=2) as (client, app):
        sid = await new_session(app)
        accepted = [post(client, sid, "a", strategy="enqueue")]
        await model.called.wait()
        accepted.append(post(client, sid, "b", strategy="enqueue"))
        await wait_until(lambda: _has(app, sid, 2))
        full = await client.post(RUN, json={"message_content": "c", "session_id": str(sid)})
        assert full.status_code == 429, full.text
        assert full.headers["Retry-After"].isdigit()
        assert full.json()["error"]["code"] == "queue_full"
        assert await unanswered(app, sid) == 2
        model.release.set()
        assert [r.status_code for r in await asyncio.gather(*accepted)] == [200, 200]


async def test_model_error_is_502_and_answers_the_message_by_failure(
    make_app: AppFactory,
) -> None:
    model = GatedModel(fail_next=True)
    model.release.set()
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        failed = await post(client, sid, "lost?")
        assert failed.status_code == 502, failed.text
        error = failed.json()["error"]
        assert error["code"] == "model_error"
        assert "boom" not in error["message"]  # the provider's body stays in the log
        run = (await client.get(f"/api/v1/runs/{error['run_id']}")).json()
        assert (run["status"], run["error_code"]) == ("failed", "model_error")
        assert run["finished_at"] is not None
        # Answered by failure: the next message is answered on its own, with it as context.
        assert await unanswered(app, sid) == 0
        retry = (await post(client, sid, "still there?")).json()
        assert retry["message"] == "echo: still there?"
        assert len(retry["message_ids"]) == 1
        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        assert [m["content"] for m in history] == ["lost?", "still there?", "echo: still there?"]


async def test_model_timeout_is_504(make_app: AppFactory) -> None:
    model = GatedModel()  # never released: only the timeout ends the run
    spec = AgentSpec(name="gated", model=model.model())
    async with make_app(agents=[spec], model_timeout_s=0.2) as (client, app):
        sid = await new_session(app)
        r = await post(client, sid, "anyone?")
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "model_timeout"
        run = (await client.get(f"/api/v1/runs/{r.json()['error']['run_id']}")).json()
        assert (run["status"], run["error_code"]) == ("failed", "model_timeout")
        assert await unanswered(app, sid) == 0


async def test_a_caller_who_disconnects_is_still_answered(make_app: AppFactory) -> None:
    model = GatedModel()
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        gone = post(client, sid, "answer me anyway")
        await model.called.wait()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.release.set()
        await wait_until(lambda: _answered(app, sid))
        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        assert [m["content"] for m in history] == ["answer me anyway", "echo: answer me anyway"]


async def _answered(app: FastAPI, sid: uuid.UUID) -> bool:
    messages, _ = await services(app).store.list_messages(sid)
    return any(m.role == "assistant" for m in messages)


async def test_tool_calls_of_a_superseded_run_reach_the_merged_run(
    make_app: AppFactory,
) -> None:
    calls = 0

    def ring_bell() -> str:
        """Ring the bell (a side effect)."""
        nonlocal calls
        calls += 1
        return "rung"

    model = ToolThenHangModel(tool="ring_bell", finish="done")
    spec = AgentSpec(name="gated", model=model.model(), tools=(ring_bell,))
    async with make_app(agents=[spec]) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "please ring")
        await model.after_tool.wait()
        second = post(client, sid, "done")
        bodies = [r.json() for r in await asyncio.gather(first, second)]
        assert bodies[0]["run_id"] == bodies[1]["run_id"]
        assert bodies[0]["superseded"] is True
        assert calls == 1
        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        assert [m["role"] for m in history] == ["user", "user", "tool", "assistant"]
        assert "ring_bell -> rung" in history[2]["content"]
        merged = model.histories[-1]
        returns = [p for m in merged for p in m.parts if type(p).__name__ == "ToolReturnPart"]
        assert [(r.tool_name, r.content) for r in returns] == [("ring_bell", "rung")]
        superseded = [r for r in {history[2]["run_id"]} if r]
        run = (await client.get(f"/api/v1/runs/{superseded[0]}")).json()
        assert run["status"] == "superseded"
        assert run["superseded_by"] == bodies[0]["run_id"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_superseding_closes_the_provider_request(make_app: AppFactory) -> None:
    async with running_fake_openai() as fake:
        spec = AgentSpec(name="gated", model=f"openai-compat:m@{fake.base_url}")
        async with make_app(agents=[spec]) as (client, app):
            sid = await new_session(app)
            first = post(client, sid, "HOLD")
            await fake.held.wait()
            second = post(client, sid, "and this")
            await fake.disconnected.wait()
            bodies = [r.json() for r in await asyncio.gather(first, second)]
    assert bodies[0]["message"] == "fake: HOLD\n---\nand this"
    assert bodies[1]["run_id"] == bodies[0]["run_id"]


async def test_shutdown_leaves_unanswered_messages_for_the_next_run(
    make_app: AppFactory,
) -> None:
    model = GatedModel()
    spec = AgentSpec(name="gated", model=model.model())
    async with make_app(agents=[spec], shutdown_grace_s=0) as (client, app):
        sid = await new_session(app)
        pending = post(client, sid, "before shutdown")
        await model.called.wait()
        store = services(app).store
    # The lifespan has ended: the caller got a defined answer and the run row is closed.
    response = await pending
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down"
    model.release.set()
    async with make_app(agents=[spec]) as (client, app):
        after = (await post(client, sid, "after restart")).json()
        assert after["message"] == "echo: before shutdown\n---\nafter restart"
        messages, _ = await services(app).store.list_messages(sid)
        runs = {m.run_id for m in messages if m.run_id}
        assert runs == {uuid.UUID(after["run_id"])}
    del store
