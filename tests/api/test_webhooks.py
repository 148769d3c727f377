"""Background runs, the message/run/delivery read APIs and signed webhooks, end to end on every
store and coordinator, with a real receiver on 127.0.0.1 that fails, times out and succeeds.

The ``held`` agent's model call waits for the test's event, which is how a test sees a message
pending, or merges messages into one run, without timing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from tests.api.test_api import assert_error
from tests.apps import AppFactory, services
from tests.webhook_receiver import running_receiver
from threadline.agents import AgentSpec
from threadline.agents.echo import last_prompt
from threadline.errors import ConfigError
from threadline.store import NewMessage

SECRET = "test-webhook-secret"
POLL_S = 0.01

pytestmark = pytest.mark.timeout(30)


def webhook_settings(**overrides: Any) -> dict[str, Any]:
    """Fast retries and a short send timeout, so a failing receiver costs the test little."""
    return {
        "webhook_secret": SECRET,
        "webhook_allowed_hosts": "127.0.0.1",
        "webhook_timeout_s": 0.5,
        "webhook_retry_initial_s": 0.01,
        "webhook_retry_max_s": 0.05,
        "webhook_poll_interval_s": 0.05,
        **overrides,
    }


def held_agent(release: asyncio.Event, name: str = "held") -> AgentSpec:
    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await release.wait()
        return ModelResponse(parts=[TextPart(f"echo: {last_prompt(messages)}")])

    return AgentSpec(name=name, model=FunctionModel(model, model_name="held"))


async def wait_for(check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll state another task owns (the sender's record of an attempt); the test's timeout
    bounds the wait."""
    while not (found := await check()):
        await asyncio.sleep(POLL_S)
    return found


async def deliveries_of(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/deliveries", params={"page_size": 500})
    assert r.status_code == 200, r.text
    return [d for d in r.json()["deliveries"] if d["session_id"] == session_id]


async def background(client: httpx.AsyncClient, agent: str, **body: Any) -> dict[str, Any]:
    r = await client.post(f"/api/v1/agent/{agent}/run", json={"background": True, **body})
    assert r.status_code == 202, r.text
    accepted: dict[str, Any] = r.json()
    return accepted


async def test_a_background_run_is_answered_and_delivered_through_failures_and_a_timeout(
    make_app: AppFactory,
) -> None:
    release = asyncio.Event()
    async with (
        running_receiver(["fail", "hang", "ok"]) as receiver,
        make_app([held_agent(release)], **webhook_settings()) as (client, _),
    ):
        accepted = await background(
            client, "held", message_content="hello later", webhook_url=receiver.url()
        )
        assert accepted["status"] == "queued"
        message_id, session_id = accepted["message_id"], accepted["session_id"]
        pending = (await client.get(f"/api/v1/messages/{message_id}")).json()
        assert (pending["status"], pending["run"], pending["reply"]) == ("pending", None, None)
        assert pending["session_id"] == session_id
        assert pending["content"] == "hello later"

        release.set()
        attempts = [await receiver.next() for _ in range(3)]
        delivered = await wait_for(lambda: _delivered(client, session_id))
        answered = (await client.get(f"/api/v1/messages/{message_id}")).json()

    assert [a.action for a in attempts] == ["fail", "hang", "ok"]
    # One delivery, sent three times: the same id and body each time, each attempt signed.
    assert len({a.delivery_id for a in attempts}) == 1
    assert len({a.body for a in attempts}) == 1
    assert all(a.verifies(SECRET) for a in attempts)
    assert not attempts[0].verifies("another-secret")
    payload = attempts[0].payload
    assert payload["id"] == attempts[0].delivery_id
    assert payload["event"] == "run.succeeded"
    assert payload["message_ids"] == [message_id]
    assert payload["session_id"] == session_id
    assert payload["reply"]["message"] == "echo: hello later"
    assert payload["error"] is None

    assert answered["status"] == "answered"
    assert answered["reply"]["message"] == "echo: hello later"
    assert answered["reply"]["message_id"] == payload["reply"]["reply_message_id"]
    assert answered["run"]["id"] == payload["run_id"]
    assert answered["run"]["status"] == "succeeded"
    assert answered["message_ids"] == [message_id]

    assert delivered["id"] == attempts[0].delivery_id
    assert (delivered["attempts"], delivered["last_status_code"]) == (3, 200)
    assert delivered["last_error"] == "no response within 0.5s"
    assert delivered["payload"] == payload


async def _delivered(client: httpx.AsyncClient, session_id: str) -> dict[str, Any] | None:
    found = await deliveries_of(client, session_id)
    return found[0] if found and found[0]["status"] == "delivered" else None


async def test_a_merged_reply_is_one_delivery_per_url_listing_every_message(
    make_app: AppFactory,
) -> None:
    release = asyncio.Event()
    # One send at a time: the second delivery waits for the first one's slot.
    one_at_a_time = webhook_settings(webhook_concurrency=1)
    async with (
        running_receiver() as receiver,
        make_app([held_agent(release)], **one_at_a_time) as (client, _),
    ):
        first = await background(
            client, "held", message_content="one", webhook_url=receiver.url("/a")
        )
        sid = first["session_id"]
        others = [
            await background(client, "held", message_content=text, session_id=sid, webhook_url=url)
            for text, url in (("two", receiver.url("/a")), ("three", receiver.url("/b")))
        ]
        release.set()
        got = sorted([await receiver.next(), await receiver.next()], key=lambda r: r.path)
        rows = await wait_for(lambda: _all_delivered(client, sid, 2))
        runs = (await client.get(f"/api/v1/sessions/{sid}/runs")).json()

    ids = [first["message_id"], *(o["message_id"] for o in others)]
    assert [r.path for r in got] == ["/a", "/b"]
    assert all(r.payload["message_ids"] == ids for r in got)
    assert got[0].payload["reply"] == got[1].payload["reply"]
    assert got[0].delivery_id != got[1].delivery_id
    assert got[0].payload["reply"]["message"] == "echo: one\n---\ntwo\n---\nthree"
    assert {r["id"] for r in rows} == {r.delivery_id for r in got}
    # Superseded runs wrote no delivery: only the run that answered did.
    succeeded = [r for r in runs["runs"] if r["status"] == "succeeded"]
    assert [r["message_ids"] for r in succeeded] == [ids]
    assert runs["total"] == len(runs["runs"])
    assert {r["run_id"] for r in rows} == {succeeded[0]["id"]}


async def _all_delivered(
    client: httpx.AsyncClient, session_id: str, count: int
) -> list[dict[str, Any]] | None:
    found = await deliveries_of(client, session_id)
    done = len(found) == count and all(d["status"] == "delivered" for d in found)
    return found if done else None


async def test_a_failed_run_is_delivered_to_its_agents_url(make_app: AppFactory) -> None:
    async def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise UnexpectedModelBehavior("the provider sent nonsense")

    async with running_receiver() as receiver:
        agent = AgentSpec(
            name="broken",
            model=FunctionModel(broken, model_name="broken"),
            webhook_url=receiver.url("/agent"),
        )
        async with make_app([agent], **webhook_settings()) as (client, _):
            r = await client.post("/api/v1/agent/broken/run", json={"message_content": "x"})
            got = await receiver.next()
            await wait_for(lambda: _all_delivered(client, got.payload["session_id"], 1))
            run_id = r.json()["error"]["run_id"]
            state = (await client.get(f"/api/v1/messages/{got.payload['message_ids'][0]}")).json()

    assert_error(r, 502, "model_error")
    assert got.path == "/agent"
    assert got.verifies(SECRET)
    assert got.payload["event"] == "run.failed"
    assert got.payload["run_id"] == run_id
    assert got.payload["reply"] is None
    assert got.payload["error"] == {
        "code": "model_error",
        "message": "the model provider failed to answer",
    }
    assert state["status"] == "failed"
    assert state["error"]["code"] == "model_error"
    assert state["reply"] is None


async def test_a_delivery_can_be_sent_again(make_app: AppFactory) -> None:
    async with (
        running_receiver() as receiver,
        make_app(**webhook_settings()) as (client, _),
    ):
        r = await client.post(
            "/api/v1/agent/echo/run",
            json={"message_content": "again", "webhook_url": receiver.url()},
        )
        assert r.status_code == 200, r.text
        first = await receiver.next()
        sid = r.json()["session_id"]
        (row,) = await wait_for(lambda: _all_delivered(client, sid, 1))
        again = await client.post(f"/api/v1/deliveries/{row['id']}/redeliver")
        resent = await receiver.next()
        (done,) = await wait_for(lambda: _all_delivered(client, sid, 1))
        failed = await client.get("/api/v1/deliveries", params={"status": "failed"})
        missing = await client.post(f"/api/v1/deliveries/{uuid.uuid4()}/redeliver")
        bad_status = await client.get("/api/v1/deliveries", params={"status": "lost"})

    assert again.status_code == 200, again.text
    assert again.json()["status"] == "pending"
    assert resent.delivery_id == first.delivery_id == row["id"]
    assert resent.body == first.body
    assert done["attempts"] == 2
    assert failed.status_code == 200
    assert all(d["status"] == "failed" for d in failed.json()["deliveries"])
    assert_error(missing, 404, "delivery_not_found")
    assert_error(bad_status, 422, "validation_error")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_webhook_urls_are_refused_unless_allowed_and_signed(make_app: AppFactory) -> None:
    name = f"refused-{uuid.uuid4()}"
    body = {"message_content": "x", "session_name": name}
    allowed_hosts = webhook_settings(webhook_allowed_hosts="hooks.invalid:8443")
    async with make_app(**allowed_hosts) as (client, _):
        for url, code in [
            ("http://169.254.169.254/latest/meta-data", "webhook_url_not_allowed"),
            ("http://hooks.invalid/hook", "webhook_url_not_allowed"),  # port 80, not 8443
            ("ftp://hooks.invalid:8443/hook", "webhook_url_not_allowed"),
            ("https://user:pw@hooks.invalid:8443/hook", "webhook_url_not_allowed"),
            ("not a url", "webhook_url_not_allowed"),
        ]:
            refused = await client.post("/api/v1/agent/echo/run", json={**body, "webhook_url": url})
            assert_error(refused, 422, code)
        allowed = await client.post(
            "/api/v1/agent/echo/run",
            json={**body, "webhook_url": "https://hooks.invalid:8443/hook", "background": True},
        )
        assert allowed.status_code == 202, allowed.text
    async with make_app() as (client, _):
        unsigned = await client.post(
            "/api/v1/agent/echo/run", json={**body, "webhook_url": "http://127.0.0.1/hook"}
        )
        assert_error(unsigned, 422, "webhook_secret_unset")
        listed = await client.get("/api/v1/sessions/" + name)
    # Only the allowed request stored a message.
    assert [m["content"] for m in listed.json()["messages"] if m["role"] == "user"] == ["x"]


async def test_background_errors_before_storing_are_the_blocking_routes(
    make_app: AppFactory,
) -> None:
    release = asyncio.Event()
    async with make_app([held_agent(release)]) as (client, _):
        first = await background(client, "held", message_content="busy")
        busy = await client.post(
            "/api/v1/agent/held/run",
            json={
                "message_content": "not now",
                "session_id": first["session_id"],
                "strategy": "reject",
                "background": True,
            },
        )
        unknown = await client.post(
            "/api/v1/agent/nobody/run", json={"message_content": "x", "background": True}
        )
        not_a_message = await client.get(f"/api/v1/messages/{uuid.uuid4()}")
        no_session = await client.get(f"/api/v1/sessions/{uuid.uuid4()}/runs")
        release.set()
        answered = await wait_for(lambda: _answered(client, first["message_id"]))

    assert_error(busy, 409, "session_busy")
    assert_error(unknown, 404, "agent_not_found")
    assert_error(not_a_message, 404, "message_not_found")
    assert_error(no_session, 404, "session_not_found")
    assert answered["reply"]["message"] == "echo: busy"


async def _answered(client: httpx.AsyncClient, message_id: str) -> dict[str, Any] | None:
    state: dict[str, Any] = (await client.get(f"/api/v1/messages/{message_id}")).json()
    return state if state["status"] == "answered" else None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_message_a_stopped_server_left_unanswered_is_answered_at_start_up(
    make_app: AppFactory,
) -> None:
    """One process serves the store alone (no Redis): what is unanswered when it starts was
    accepted by a process that stopped before answering, and would otherwise wait for its
    session's next message."""
    async with running_receiver() as receiver:
        async with make_app(**webhook_settings()) as (_, app):
            store = services(app).store
            session = await store.create_session("echo", user_id=f"u-{uuid.uuid4()}")
            options = {"agent": "echo", "history_limit": 20, "webhook_url": receiver.url()}
            left, _ = await store.add_user_message(
                session.id, NewMessage(uuid.uuid4(), "user", "left behind", options=options)
            )
        async with make_app(**webhook_settings()) as (client, _):
            got = await receiver.next()
            state = await wait_for(lambda: _answered(client, str(left.id)))
            await wait_for(lambda: _all_delivered(client, str(session.id), 1))

    assert got.payload["message_ids"] == [str(left.id)]
    assert state["reply"]["message"] == "echo: left behind"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_agent_webhook_needs_a_secret_and_an_http_url(make_app: AppFactory) -> None:
    hooked = AgentSpec(name="hooked", webhook_url="http://127.0.0.1:9/hook")
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET is unset"):
        async with make_app([hooked]):
            pass
    bad = AgentSpec(name="hooked", webhook_url="file:///etc/passwd")
    with pytest.raises(ConfigError, match="must be an http"):
        async with make_app([bad], **webhook_settings()):
            pass
