"""Failure paths through the HTTP API: every run ends in a defined state, every caller gets a
stable code with a safe message, and a failure never poisons the session's next message.

The models here are driven by their prompt: ``/ring`` calls the ``ring_bell`` tool, ``/boom``
the ``boom`` tool (which raises), ``fail`` makes the model fail after its tools ran, and a
prompt that is exactly ``hang`` waits until the run is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from tests.api.test_queue_api import new_session, post, unanswered, wait_until
from tests.apps import AppFactory, services
from tests.models import GatedModel
from tests.tcp_proxy import tcp_proxy
from threadline.agents import AgentSpec
from threadline.agents.echo import last_prompt
from threadline.coordination import TurnRequest
from threadline.coordination.local import user_message
from threadline.store import PostgresStore


@dataclass
class ScriptedModel:
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    histories: list[list[ModelMessage]] = field(default_factory=list)

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.histories.append(messages)
        prompt = last_prompt(messages)
        returned = any(isinstance(p, ToolReturnPart) for p in messages[-1].parts)
        if not returned:
            for tool in ("ring_bell", "boom"):
                if f"/{tool.split('_')[0]}" in prompt:
                    return ModelResponse(parts=[ToolCallPart(tool, {})])
        if "fail" in prompt:
            raise ModelHTTPError(status_code=500, model_name="scripted", body="secret body")
        if prompt == "hang":
            self.hanging.set()
            await asyncio.Event().wait()
        return ModelResponse(parts=[TextPart(f"echo: {prompt}")])


@dataclass
class Tools:
    rung: int = 0

    def ring_bell(self) -> str:
        """Ring the bell (a side effect)."""
        self.rung += 1
        return "rung"

    @staticmethod
    def boom() -> str:
        """A tool with a bug."""
        raise KeyError("2")

    def spec(self, model: ScriptedModel) -> AgentSpec:
        return AgentSpec(
            name="gated",
            model=FunctionModel(model, model_name="scripted"),
            tools=(self.ring_bell, self.boom),
        )


async def test_a_tool_that_raises_fails_its_run_cleanly_and_the_session_goes_on(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    model, tools = ScriptedModel(), Tools()
    async with make_app(agents=[tools.spec(model)]) as (client, app):
        sid = await new_session(app)
        failed = await post(client, sid, "/boom please")
        assert failed.status_code == 502, failed.text
        error = failed.json()["error"]
        assert error["code"] == "tool_error"
        assert "boom" in error["message"]
        assert "KeyError" not in error["message"]
        run = (await client.get(f"/api/v1/runs/{error['run_id']}")).json()
        assert (run["status"], run["error_code"]) == ("failed", "tool_error")
        assert run["finished_at"] is not None
        # The traceback is in the log with the run's and the session's ids.
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(
            error["run_id"] in r.getMessage() and str(sid) in r.getMessage() and r.exc_info
            for r in logged
        )
        # Not a poison message: the next one is answered on its own.
        after = await post(client, sid, "hello again")
        assert after.status_code == 200, after.text
        assert after.json()["message"] == "echo: hello again"
        assert len(after.json()["message_ids"]) == 1
        assert await unanswered(app, sid) == 0


async def test_a_failed_run_keeps_the_tool_calls_it_completed(make_app: AppFactory) -> None:
    model, tools = ScriptedModel(), Tools()
    async with make_app(agents=[tools.spec(model)]) as (client, app):
        sid = await new_session(app)
        failed = await post(client, sid, "/ring then fail")
        assert failed.status_code == 502, failed.text
        assert failed.json()["error"]["code"] == "model_error"
        assert "secret body" not in failed.text
        assert tools.rung == 1
        history = (await client.get(f"/api/v1/sessions/{sid}")).json()["messages"]
        assert [m["role"] for m in history] == ["user", "tool"]
        assert "ring_bell -> rung" in history[1]["content"]
        after = await post(client, sid, "did it ring?")
        assert after.status_code == 200, after.text
        seen = model.histories[-1]
        returns = [p for m in seen for p in m.parts if isinstance(p, ToolReturnPart)]
        assert [(r.tool_name, r.content) for r in returns] == [("ring_bell", "rung")]
        assert tools.rung == 1  # nothing ran twice


async def test_a_superseded_run_saves_only_its_own_tool_calls(make_app: AppFactory) -> None:
    model, tools = ScriptedModel(), Tools()
    async with make_app(agents=[tools.spec(model)]) as (client, app):
        sid = await new_session(app)
        rang = await post(client, sid, "/ring once")
        assert rang.status_code == 200, rang.text
        for round_ in range(2):
            model.hanging.clear()
            hanging = post(client, sid, "hang")
            await model.hanging.wait()
            merged = await post(client, sid, f"go {round_}")
            assert merged.status_code == 200, merged.text
            assert (await hanging).json()["superseded"] is True
        messages, _ = await services(app).store.list_messages(sid)
        # The history's tool call is stored once, in the reply that made it; superseding a
        # run that called no tool writes no tool row.
        assert [m.role for m in messages if m.role == "tool"] == []
        assert tools.rung == 1


@pytest.mark.parametrize("backend", ["postgres", "postgres+redis"], indirect=True)
async def test_a_store_outage_inside_a_run_is_503_and_the_failure_is_recorded_on_return(
    make_app: AppFactory, pg_url: str
) -> None:
    model = GatedModel()
    parts = urlsplit(pg_url)
    async with tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        spec = AgentSpec(name="gated", model=model.model())
        async with make_app(agents=[spec], database_url=via_proxy, pool_min_size=1) as (
            client,
            app,
        ):
            sid = await new_session(app)
            pending = post(client, sid, "during the outage")
            await model.called.wait()
            await proxy.cut()
            model.release.set()
            response = await pending
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "store_unavailable"
            assert "PostgreSQL" not in error["message"]  # no driver text for the client
            await proxy.start(proxy.port)
            direct = await PostgresStore.connect(pg_url, min_size=1, max_size=2)
            try:
                # Once the database is back, the failure is recorded without a new message:
                # no run is left running and the message is answered by failure.
                await wait_until(lambda: _failure_recorded(direct, sid))
                assert await direct.unanswered(sid) == []
            finally:
                await direct.aclose()
            after = await post(client, sid, "and now?")
            assert after.status_code == 200, after.text
            assert after.json()["message"] == "echo: and now?"


async def _failure_recorded(store: PostgresStore, sid: uuid.UUID) -> bool:
    rows = await store.pool.fetch("SELECT status FROM runs WHERE session_id = $1", sid)
    return bool(rows) and all(r["status"] == "failed" for r in rows)


async def test_a_session_deleted_mid_run_answers_404(make_app: AppFactory) -> None:
    model = GatedModel()
    async with make_app(agents=[AgentSpec(name="gated", model=model.model())]) as (client, app):
        sid = await new_session(app)
        pending = post(client, sid, "about to vanish")
        await model.called.wait()
        deleted = await client.delete(f"/api/v1/sessions/{sid}")
        assert deleted.status_code == 204, deleted.text
        model.release.set()
        response = await pending
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "session_not_found"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_stored_message_of_an_agent_no_longer_served_fails_with_its_code(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A message stored for an agent the server no longer has (removed from the config before
    a restart answered it) ends answered by failure with ``agent_not_found``, a documented
    code, and a warning: not ``run_failed`` with a traceback, as for a bug."""
    retired = AgentSpec(name="retired", model=FunctionModel(ScriptedModel(), model_name="x"))
    async with make_app(agents=[retired]) as (_, app):
        store = services(app).store
        sid = await new_session(app, "retired")
        asked = TurnRequest(sid, "retired", "are you there?", "merge")
        message, _ = await store.add_user_message(sid, user_message(asked))
    caplog.clear()

    async with make_app() as (client, app):  # its start-up answers what was left unanswered
        store = services(app).store
        await wait_until(lambda: store.answer_for(message.id))
        found = await store.answer_for(message.id)
        assert found is not None
        run = (await client.get(f"/api/v1/runs/{found[0].id}")).json()

    assert (run["status"], run["error_code"]) == ("failed", "agent_not_found"), run
    assert "retired" in run["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
