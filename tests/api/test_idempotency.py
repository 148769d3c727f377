"""Idempotency keys through the HTTP API, on every store and coordinator (``backend``).

A request repeating a key stores nothing and gets the answer of the message the key names:
pending (it joins the same run, never superseding it), answered (the stored reply) or failed
(the same error). Ordering is controlled by ``GatedModel`` (``tests/models.py``); a repeat is
known to wait once the coordinator counts it (``repeats_waiting``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.api.test_queue_api import RUN, new_session, wait_until
from tests.apps import AppFactory, services
from tests.models import GatedModel
from threadline.agents import AgentSpec
from threadline.coordination import TurnRequest
from threadline.coordination.local import user_message

pytestmark = pytest.mark.timeout(30)

REPLAYED = "Idempotent-Replayed"


def post(
    client: httpx.AsyncClient,
    session_id: uuid.UUID,
    text: str,
    key: str | None = None,
    **extra: Any,
) -> asyncio.Task[httpx.Response]:
    body = {"message_content": text, "session_id": str(session_id), **extra}
    if key is not None:
        body["idempotency_key"] = key
    return asyncio.create_task(client.post(RUN, json=body))


async def repeats_waiting(app: FastAPI, count: int) -> None:
    async def counted() -> bool:
        return bool(services(app).coordinator.metrics()["repeats_waiting"] >= count)

    await wait_until(counted)


async def user_messages(client: httpx.AsyncClient, session_id: uuid.UUID) -> list[Any]:
    history = (await client.get(f"/api/v1/sessions/{session_id}")).json()["messages"]
    return [m for m in history if m["role"] == "user"]


async def run_statuses(client: httpx.AsyncClient, session_id: uuid.UUID | str) -> list[str]:
    """The statuses of the session's runs, oldest first: one run per model call, and a run a
    newer message merged shows as ``superseded``. (The model's own counters are shared with
    sessions other tests left unanswered in a shared database, which start-up recovers.)"""
    runs = (await client.get(f"/api/v1/sessions/{session_id}/runs")).json()["runs"]
    return [r["status"] for r in runs]


def gated() -> tuple[GatedModel, list[AgentSpec]]:
    model = GatedModel()
    return model, [AgentSpec(name="gated", model=model.model())]


async def test_a_repeat_while_pending_joins_the_same_run_without_superseding_it(
    make_app: AppFactory,
) -> None:
    model, agents = gated()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "hello", "wamid.1")
        await model.called.wait()
        repeat = post(client, sid, "hello", "wamid.1")
        await repeats_waiting(app, 1)
        assert not repeat.done()
        model.release.set()
        original, repeated = await first, await repeat

        assert original.status_code == repeated.status_code == 200, repeated.text
        assert repeated.json() == original.json()
        assert repeated.headers[REPLAYED] == "true"
        assert REPLAYED not in original.headers
        body = original.json()
        assert body["message"] == "echo: hello"
        assert body["message_ids"] == [body["message_id"]]
        # One model call, never cancelled: the repeat was no new message to merge.
        assert await run_statuses(client, sid) == ["succeeded"]
        run = (await client.get(f"/api/v1/runs/{body['run_id']}")).json()
        assert (run["status"], run["superseded_by"]) == ("succeeded", None)
        assert [m["id"] for m in await user_messages(client, sid)] == [body["message_id"]]
        assert services(app).coordinator.metrics()["repeats_waiting"] == 0


async def test_a_repeat_after_the_answer_gets_the_stored_reply(make_app: AppFactory) -> None:
    model, agents = gated()
    model.release.set()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        original = await post(client, sid, "hello", "k-1")
        later = await post(client, sid, "after", "k-2")
        repeated = await post(client, sid, "hello", "k-1")

        assert repeated.status_code == 200, repeated.text
        assert repeated.headers[REPLAYED] == "true"
        assert repeated.json() == original.json()
        assert later.json()["message_id"] != original.json()["message_id"]
        assert await run_statuses(client, sid) == ["succeeded", "succeeded"]
        assert [m["content"] for m in await user_messages(client, sid)] == ["hello", "after"]


async def test_a_repeat_of_a_failed_message_gets_the_same_error(make_app: AppFactory) -> None:
    model, agents = gated()
    model.fail_next = True
    model.release.set()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        failed = await post(client, sid, "lost?", "k")
        repeated = await post(client, sid, "lost?", "k")

        assert failed.status_code == repeated.status_code == 502, repeated.text
        assert repeated.json() == failed.json()
        assert repeated.json()["error"]["code"] == "model_error"
        assert await run_statuses(client, sid) == ["failed"]
        assert len(await user_messages(client, sid)) == 1


async def test_a_repeat_while_the_original_fails_gets_the_same_error(
    make_app: AppFactory,
) -> None:
    model, agents = gated()
    model.fail_next = True
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "lost?", "k")
        await model.called.wait()
        repeat = post(client, sid, "lost?", "k")
        await repeats_waiting(app, 1)
        model.release.set()
        failed, repeated = await first, await repeat

        assert failed.status_code == repeated.status_code == 502, repeated.text
        assert repeated.json()["error"] == failed.json()["error"]


async def test_a_key_sent_again_with_another_body_is_422(make_app: AppFactory) -> None:
    model, agents = gated()
    model.release.set()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        original = await post(client, sid, "hello", "k")
        for change in (
            {"message_content": "hello!"},
            {"context": {"lang": "fr"}},
            {"channel_payload": {"from": "+1"}},
            {"user_id": "someone-else"},
        ):
            body = {"message_content": "hello", "idempotency_key": "k", "session_id": str(sid)}
            reused = await client.post(RUN, json={**body, **change})
            assert reused.status_code == 422, (change, reused.text)
            assert reused.json()["error"]["code"] == "idempotency_key_reused"
            assert original.json()["message_id"] in reused.json()["error"]["message"]
        # How to answer is not part of the message: another strategy or window replays.
        same = await post(client, sid, "hello", "k", strategy="enqueue", message_limit=3)
        assert same.status_code == 200, same.text
        assert same.json() == original.json()
        assert len(await user_messages(client, sid)) == 1


async def test_a_reject_repeat_joins_the_run_instead_of_409(make_app: AppFactory) -> None:
    model, agents = gated()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "working", "k")
        await model.called.wait()
        busy = await post(client, sid, "new", strategy="reject")
        assert busy.status_code == 409, busy.text  # a new message is refused...
        repeat = post(client, sid, "working", "k", strategy="reject")
        await repeats_waiting(app, 1)  # ...a repeat joins
        model.release.set()
        original, repeated = await first, await repeat

        assert repeated.status_code == 200, repeated.text
        assert repeated.json() == original.json()
        assert await run_statuses(client, sid) == ["succeeded"]


async def test_a_repeat_is_never_refused_as_queue_full(make_app: AppFactory) -> None:
    model, agents = gated()
    async with make_app(agents=agents, session_queue_max=1) as (client, app):
        sid = await new_session(app)
        first = post(client, sid, "only one", "k")
        await model.called.wait()
        full = await post(client, sid, "another")
        assert full.status_code == 429, full.text
        repeat = post(client, sid, "only one", "k")
        await repeats_waiting(app, 1)
        model.release.set()
        assert (await repeat).json() == (await first).json()


async def test_two_requests_with_one_key_at_once_store_one_message(
    make_app: AppFactory,
) -> None:
    model, agents = gated()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        both = [post(client, sid, "twice", "k"), post(client, sid, "twice", "k")]
        await model.called.wait()
        await repeats_waiting(app, 1)
        model.release.set()
        responses = await asyncio.gather(*both)

        assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
        assert responses[0].json() == responses[1].json()
        assert sorted(REPLAYED in r.headers for r in responses) == [False, True]
        assert len(await user_messages(client, sid)) == 1
        assert await run_statuses(client, sid) == ["succeeded"]


async def test_a_key_by_header_and_by_session_name_as_a_channel_sends_it(
    make_app: AppFactory,
) -> None:
    model, agents = gated()
    model.release.set()
    async with make_app(agents=agents) as (client, _app):
        chat = f"whatsapp:+{uuid.uuid4().int % 10**12}"
        body = {"message_content": "hi", "session_name": chat, "user_id": "bot"}
        key = {"Idempotency-Key": "wamid.HBgLMzQ2MDAwMDAwMDAVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"}
        first = await client.post(RUN, json=body, headers=key)
        again = await client.post(RUN, json=body, headers=key)
        both = await client.post(
            RUN, json={**body, "idempotency_key": key["Idempotency-Key"]}, headers=key
        )
        other_chat = await client.post(RUN, json={**body, "session_name": f"{chat}-2"}, headers=key)

        assert first.status_code == 200, first.text
        assert again.json() == both.json() == first.json()
        assert again.headers[REPLAYED] == both.headers[REPLAYED] == "true"
        # A key names a message within its session only.
        assert other_chat.status_code == 200, other_chat.text
        assert REPLAYED not in other_chat.headers
        assert other_chat.json()["session_id"] != first.json()["session_id"]
        assert await run_statuses(client, first.json()["session_id"]) == ["succeeded"]
        assert await run_statuses(client, other_chat.json()["session_id"]) == ["succeeded"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_bad_keys_are_422_and_store_nothing(make_app: AppFactory) -> None:
    model, agents = gated()
    model.release.set()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        body = {"message_content": "hi", "session_id": str(sid)}
        for key in ("", "x" * 256, " padded", "tab\tinside", "caf\u00e9", "nul\u0000"):
            bad = await client.post(RUN, json={**body, "idempotency_key": key})
            assert bad.status_code == 422, (key, bad.text)
            assert bad.json()["error"]["code"] == "validation_error"
        for header in ("x" * 256, "tab\tinside"):
            bad = await client.post(RUN, json=body, headers={"Idempotency-Key": header})
            assert bad.status_code == 422, (header, bad.text)
        differ = await client.post(
            RUN, json={**body, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
        )
        assert differ.status_code == 422, differ.text
        assert differ.json()["error"]["code"] == "invalid_idempotency_key"
        sessionless = await client.post(RUN, json={"message_content": "hi", "idempotency_key": "a"})
        assert sessionless.status_code == 422, sessionless.text
        assert sessionless.json()["error"]["code"] == "invalid_idempotency_key"
        assert "session" in sessionless.json()["error"]["message"]
        by_header = await client.post(
            RUN, json={"message_content": "hi"}, headers={"Idempotency-Key": "a"}
        )
        assert by_header.json()["error"]["code"] == "invalid_idempotency_key"
        assert await user_messages(client, sid) == []
        longest = await client.post(RUN, json={**body, "idempotency_key": "k " + "x" * 253})
        assert longest.status_code == 200, longest.text


async def test_a_repeat_answers_an_original_nobody_picked_up(make_app: AppFactory) -> None:
    """The original was stored, and its process went away before any run took it (here:
    stored straight into the store). A repeat has it answered instead of waiting forever."""
    model, agents = gated()
    model.release.set()
    async with make_app(agents=agents) as (client, app):
        store = services(app).store
        session = await store.create_session("gated", user_id=f"u-{uuid.uuid4()}")
        request = TurnRequest(
            session.id, "gated", "stranded", "merge", session.user_id, idempotency_key="k"
        )
        stranded, _ = await store.add_user_message(session.id, user_message(request))

        repeated = await post(client, session.id, "stranded", "k")

        assert repeated.status_code == 200, repeated.text
        assert repeated.headers[REPLAYED] == "true"
        assert repeated.json()["message_id"] == str(stranded.id)
        assert repeated.json()["message"] == "echo: stranded"
        assert await store.unanswered(session.id) == []
        assert len(await user_messages(client, session.id)) == 1


async def test_a_background_repeat_gets_202_with_the_same_message(make_app: AppFactory) -> None:
    model, agents = gated()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        body = {"message_content": "later", "session_id": str(sid), "background": True}
        first = await client.post(RUN, json={**body, "idempotency_key": "k"})
        assert first.status_code == 202, first.text
        await model.called.wait()
        repeat = await client.post(RUN, json=body, headers={"Idempotency-Key": "k"})
        assert repeat.status_code == 202, repeat.text
        assert repeat.json()["message_id"] == first.json()["message_id"]
        # A blocking repeat joins the same run, still held.
        blocking = post(client, sid, "later", "k")
        await repeats_waiting(app, 1)
        model.release.set()
        answer = await blocking
        assert answer.status_code == 200, answer.text
        assert answer.json()["message_id"] == first.json()["message_id"]
        assert await run_statuses(client, sid) == ["succeeded"]
        assert len(await user_messages(client, sid)) == 1


async def test_a_stream_repeat_follows_the_same_message(make_app: AppFactory) -> None:
    model, agents = gated()
    model.release.set()
    async with make_app(agents=agents) as (client, app):
        sid = await new_session(app)
        original = await post(client, sid, "stream me", "k")
        body = {"message_content": "stream me", "session_id": str(sid), "stream": True}
        streamed = await client.post(RUN, json={**body, "idempotency_key": "k"})

        assert streamed.status_code == 200, streamed.text
        assert streamed.headers["content-type"].startswith("text/event-stream")
        data = [line for line in streamed.text.splitlines() if line.startswith("data:")]
        assert original.json()["message_id"] in data[0]  # message.accepted names the original
        assert original.json()["message"] in data[-1]  # and the stream ends with its answer
        assert await run_statuses(client, sid) == ["succeeded"]
        assert len(await user_messages(client, sid)) == 1
