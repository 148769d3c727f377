"""The HTTP API end to end on both stores: routes, validation, auth and error bodies."""

from __future__ import annotations

import gc
import uuid

import pytest

from tests.apps import AppFactory, services


def assert_error(response: object, status: int, code: str) -> None:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_run_creates_a_session_and_stores_both_rows(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        r = await client.post("/api/v1/agent/echo/run", json={"message_content": "hello there"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert "hello there" in body["message"]
        assert body["success"] is True
        assert body["superseded"] is False
        assert len(body["message_ids"]) == 1
        detail = (await client.get(f"/api/v1/sessions/{body['session_id']}")).json()
        rows = [(m["seq"], m["role"], m["run_id"]) for m in detail["messages"]]
        assert rows == [(1, "user", None), (2, "assistant", body["run_id"])]
        assert detail["messages"][0]["id"] == body["message_ids"][0]
        run = (await client.get(f"/api/v1/runs/{body['run_id']}")).json()
        assert run["status"] == "succeeded"
        assert run["message_ids"] == body["message_ids"]
        assert run["reply_message_id"] == detail["messages"][1]["id"]
        assert run["finished_at"] is not None


async def test_requests_without_session_fields_never_share_a_session(
    make_app: AppFactory,
) -> None:
    async with make_app() as (client, _):
        first = await client.post("/api/v1/agent/echo/run", json={"message_content": "a"})
        second = await client.post("/api/v1/agent/echo/run", json={"message_content": "b"})
        assert first.json()["session_id"] != second.json()["session_id"]


async def test_session_name_continues_the_conversation_per_user(make_app: AppFactory) -> None:
    user = f"u-{uuid.uuid4()}"
    async with make_app() as (client, _):
        body = {"message_content": "one", "session_name": "chat", "user_id": user}
        first = (await client.post("/api/v1/agent/echo/run", json=body)).json()
        body["message_content"] = "two"
        second = (await client.post("/api/v1/agent/echo/run", json=body)).json()
        assert first["session_id"] == second["session_id"]
        other = await client.post(
            "/api/v1/agent/echo/run",
            json={"message_content": "x", "session_name": "chat", "user_id": f"{user}-b"},
        )
        assert other.json()["session_id"] != first["session_id"]
        by_name = await client.get("/api/v1/sessions/chat", params={"user_id": user})
        contents = [m["content"] for m in by_name.json()["messages"]]
        assert contents == ["one", "echo: one", "two", "echo: two"]


async def test_history_window_reaches_the_model(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        first = (
            await client.post("/api/v1/agent/echo/run", json={"message_content": "remember me"})
        ).json()
        again = await client.post(
            "/api/v1/agent/echo/run",
            json={
                "message_content": '/call conversation_context {"key": "k"}',
                "session_id": first["session_id"],
                "context": {"k": "v42"},
            },
        )
        assert again.status_code == 200, again.text
        body = again.json()
        assert body["tool_calls"][0]["tool_name"] == "conversation_context"
        assert body["tool_outputs"][0]["content"] == "v42"
        assert "[conversation_context -> v42]" in body["message"]


async def test_pagination_of_messages_and_sessions(make_app: AppFactory) -> None:
    user = f"u-{uuid.uuid4()}"
    async with make_app() as (client, _):
        sid = None
        for i in range(3):
            payload = {"message_content": f"m{i}", "user_id": user}
            if sid:
                payload["session_id"] = sid
            sid = (await client.post("/api/v1/agent/echo/run", json=payload)).json()["session_id"]
        page = (
            await client.get(f"/api/v1/sessions/{sid}", params={"page": 2, "page_size": 4})
        ).json()
        assert page["total_messages"] == 6
        assert [m["seq"] for m in page["messages"]] == [5, 6]
        await client.post("/api/v1/agent/echo/run", json={"message_content": "x", "user_id": user})
        sessions = (
            await client.get("/api/v1/sessions", params={"user_id": user, "page_size": 1})
        ).json()
        assert sessions["total"] == 2
        assert len(sessions["sessions"]) == 1


async def test_delete_session(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        body = (await client.post("/api/v1/agent/echo/run", json={"message_content": "x"})).json()
        assert (await client.delete(f"/api/v1/sessions/{body['session_id']}")).status_code == 204
        assert_error(
            await client.get(f"/api/v1/sessions/{body['session_id']}"), 404, "session_not_found"
        )
        assert_error(await client.get(f"/api/v1/runs/{body['run_id']}"), 404, "run_not_found")


async def test_agents_are_listed_under_both_paths(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        for path in ("/api/v1/agents", "/api/v1/agent/list"):
            names = {a["name"] for a in (await client.get(path)).json()}
            assert {"echo", "assistant"} <= names


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "message_content"),
        ({"message_content": ""}, "message_content"),
        ({"message_content": "   "}, "message_content"),
        ({"message_content": "x", "session_id": "not-a-uuid"}, "session_id"),
        ({"message_content": "x", "strategy": "shout"}, "strategy"),
        ({"message_content": "x", "message_limit": -1}, "message_limit"),
        ({"message_content": "x", "context": [1, 2]}, "context"),
    ],
)
async def test_invalid_bodies_get_422_with_json(
    make_app: AppFactory, payload: dict[str, object], field: str
) -> None:
    async with make_app() as (client, _):
        r = await client.post("/api/v1/agent/echo/run", json=payload)
        assert_error(r, 422, "validation_error")
        assert field in r.json()["error"]["message"]


async def test_not_json_gets_422(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        r = await client.post(
            "/api/v1/agent/echo/run", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert_error(r, 422, "validation_error")


async def test_unknown_things_get_404(make_app: AppFactory) -> None:
    async with make_app() as (client, app):
        assert_error(
            await client.post("/api/v1/agent/nobody/run", json={"message_content": "x"}),
            404,
            "agent_not_found",
        )
        missing = str(uuid.uuid4())
        assert_error(
            await client.post(
                "/api/v1/agent/echo/run", json={"message_content": "x", "session_id": missing}
            ),
            404,
            "session_not_found",
        )
        assert_error(await client.get(f"/api/v1/runs/{missing}"), 404, "run_not_found")
        assert_error(await client.get("/api/v1/nothing-here"), 404, "not_found")
        sessions, _ = await services(app).store.list_sessions(limit=1)
        assert all(s.agent != "nobody" for s in sessions)


async def test_oversized_message_and_body_get_413_and_store_nothing(
    make_app: AppFactory,
) -> None:
    user = f"u-{uuid.uuid4()}"
    async with make_app(max_message_chars=10, max_body_bytes=2048) as (client, app):
        r = await client.post(
            "/api/v1/agent/echo/run", json={"message_content": "x" * 11, "user_id": user}
        )
        assert_error(r, 413, "payload_too_large")
        big = {"message_content": "y", "user_id": user, "context": {"pad": "z" * 4096}}
        assert_error(
            await client.post("/api/v1/agent/echo/run", json=big), 413, "payload_too_large"
        )
        _, total = await services(app).store.list_sessions(user_id=user)
        assert total == 0


async def test_api_key_is_required_when_configured(make_app: AppFactory) -> None:
    async with make_app(api_key="s3cret") as (client, _):
        assert_error(await client.get("/api/v1/agents"), 401, "unauthorized")
        assert_error(
            await client.get("/api/v1/agents", headers={"X-API-Key": "wrong"}),
            401,
            "unauthorized",
        )
        ok = await client.get("/api/v1/agents", headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        # The API's description needs a key too (any key: admin or user).
        assert_error(await client.get("/openapi.json"), 401, "unauthorized")
        key = {"X-API-Key": "s3cret"}
        assert (await client.get("/openapi.json", headers=key)).status_code == 200
        assert (await client.get("/docs", headers=key)).status_code == 200


async def test_health_and_ready(make_app: AppFactory, backend: str) -> None:
    async with make_app() as (client, _):
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = (await client.get("/ready")).json()
        assert ready == {"status": "ready", "store": backend.split("+")[0]}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_gc_is_tuned_once_the_app_is_up(make_app: AppFactory) -> None:
    threshold = gc.get_threshold()
    try:
        async with make_app(gc_tuning=True) as (client, _):
            assert gc.get_threshold() == (20_000, 20, 20)
            assert gc.get_freeze_count() > 0
            ok = await client.post("/api/v1/agent/echo/run", json={"message_content": "x"})
            assert ok.status_code == 200
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
