"""Several API keys (``THREADLINE_API_KEYS_FILE``): admin and user keys on every route, rate
limits, reloading a revoked key, and no route reachable without a key."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute, Mount, Route

from tests.api.test_api import assert_error
from tests.apps import AppFactory
from threadline.keyfile import ApiKey, generate_key, hash_key, revoke_key, write_keys

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Keys:
    path: Path
    admin: str
    alice: str
    bob: str
    limited: str  # alice's too, 3 requests per minute
    # User ids unique per test: the PostgreSQL database is shared by every test.
    alice_id: str
    bob_id: str


def make_keys(directory: Path) -> Keys:
    # Names unique per test: with Redis, rate-limit windows are shared by every process.
    tag = uuid.uuid4().hex[:8]
    alice_id, bob_id = f"alice-{tag}", f"bob-{tag}"
    admin, alice, bob, limited = (generate_key() for _ in range(4))
    entries = [
        ApiKey(f"admin-{tag}", hash_key(admin), "admin"),
        ApiKey(f"alice-{tag}", hash_key(alice), "user", alice_id),
        ApiKey(f"bob-{tag}", hash_key(bob), "user", bob_id),
        ApiKey(f"limited-{tag}", hash_key(limited), "user", alice_id, rate_limit_per_min=3),
    ]
    path = directory / "keys.toml"
    write_keys(path, entries)
    return Keys(path, admin, alice, bob, limited, alice_id, bob_id)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def headers(key: str | None) -> dict[str, str]:
    return {} if key is None else {"X-API-Key": key}


# -- every route under each kind of key ---------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """What alice owns, made through the API with her key."""

    session_id: str
    run_id: str
    message_id: str
    delivery_id: str
    response_id: str


WEBHOOKS = {
    "webhook_secret": "test-webhook-secret",
    "webhook_allowed_hosts": "127.0.0.1:9",
    # Port 9 refuses: the delivery stays, retried rarely enough to cost the test nothing.
    "webhook_retry_initial_s": 60.0,
    "webhook_poll_interval_s": 5.0,
}


async def make_owned(client: httpx.AsyncClient, key: str) -> Owned:
    body = {"message_content": "mine", "webhook_url": "http://127.0.0.1:9/hook"}
    run = await client.post("/api/v1/agent/echo/run", json=body, headers=headers(key))
    assert run.status_code == 200, run.text
    deliveries = (await client.get("/api/v1/deliveries", headers=headers(key))).json()
    [delivery] = [d for d in deliveries["deliveries"] if d["run_id"] == run.json()["run_id"]]
    responded = await client.post(
        "/v1/responses", json={"model": "echo", "input": "hi"}, headers=headers(key)
    )
    assert responded.status_code == 200, responded.text
    return Owned(
        session_id=run.json()["session_id"],
        run_id=run.json()["run_id"],
        message_id=run.json()["message_id"],
        delivery_id=delivery["id"],
        response_id=responded.json()["id"],
    )


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    # Expected status for: admin, alice (the owner), bob (another user).
    admin: int
    alice: int
    bob: int
    json: dict[str, Any] | None = None
    extra_headers: dict[str, str] | None = None


def cases(o: Owned, alice: str) -> list[Case]:
    run_in_alices = {"message_content": "x", "session_id": o.session_id}
    as_alice = {"message_content": "x", "user_id": alice}
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    return [
        Case("GET", "/api/v1/agents", 200, 200, 200),
        Case("GET", "/api/v1/agent/list", 200, 200, 200),
        Case("POST", "/api/v1/agent/echo/run", 200, 200, 404, json=run_in_alices),
        Case("POST", "/api/v1/agent/echo/run", 200, 200, 403, json=as_alice),
        Case("POST", "/api/v1/agent/echo/run", 200, 200, 200, json={"message_content": "x"}),
        Case("GET", "/api/v1/sessions", 200, 200, 200),
        Case("GET", f"/api/v1/sessions?user_id={alice}", 200, 200, 403),
        Case("GET", f"/api/v1/sessions/{o.session_id}", 200, 200, 404),
        Case("GET", f"/api/v1/sessions/{o.session_id}?user_id={alice}", 200, 200, 403),
        Case("GET", f"/api/v1/sessions/{o.session_id}/runs", 200, 200, 404),
        # No run in flight: 409 says the route was reached, 404 that the session is unseen.
        Case("POST", f"/api/v1/sessions/{o.session_id}/cancel", 409, 409, 404),
        Case("GET", f"/api/v1/runs/{o.run_id}", 200, 200, 404),
        Case("GET", f"/api/v1/runs/{o.run_id}/events", 200, 200, 404),
        Case("POST", f"/api/v1/runs/{o.run_id}/cancel", 409, 409, 404),
        Case("GET", f"/api/v1/messages/{o.message_id}", 200, 200, 404),
        Case("GET", f"/api/v1/messages/{o.message_id}/events", 200, 200, 404),
        Case("GET", "/api/v1/deliveries", 200, 200, 200),
        Case("POST", f"/api/v1/deliveries/{o.delivery_id}/redeliver", 200, 200, 404),
        Case("GET", "/v1/models", 200, 200, 200),
        Case("GET", "/v1/models/echo", 200, 200, 200),
        Case("POST", "/v1/chat/completions", 200, 200, 200, json=chat),
        Case("POST", "/v1/chat/completions", 200, 200, 403, json={**chat, "user": alice}),
        Case(
            "POST",
            "/v1/chat/completions",
            200,
            200,
            404,
            json=chat,
            extra_headers={"X-Session-Id": o.session_id},
        ),
        Case(
            "POST",
            "/v1/responses",
            200,
            200,
            403,
            json={"model": "echo", "input": "x", "user": alice},
        ),
        Case(
            "POST",
            "/v1/responses",
            200,
            200,
            404,
            json={"model": "echo", "input": "x", "previous_response_id": o.response_id},
        ),
        Case(
            "POST",
            "/v1/responses",
            200,
            200,
            404,
            json={"model": "echo", "input": "x", "conversation": o.session_id},
        ),
        Case("GET", f"/v1/responses/{o.response_id}", 200, 200, 404),
        Case("POST", f"/v1/responses/{o.response_id}/cancel", 409, 409, 404),
        Case("GET", "/debug/metrics", 200, 403, 403),
        Case("POST", "/debug/metrics/reset", 200, 403, 403),
        Case("GET", "/openapi.json", 200, 200, 200),
        Case("GET", "/docs", 200, 200, 200),
        Case("GET", "/redoc", 200, 200, 200),
        Case("GET", "/health", 200, 200, 200),
        Case("GET", "/ready", 200, 200, 200),
        Case("GET", "/", 200, 200, 200),
        Case("DELETE", f"/api/v1/sessions/{o.session_id}", 204, 204, 404),
    ]


OPEN = {"/health", "/ready", "/"}


async def test_every_route_under_each_kind_of_key(make_app: AppFactory, keys: Keys) -> None:
    async with make_app(api_keys_file=keys.path, **WEBHOOKS) as (client, _):
        callers = {"admin": keys.admin, "alice": keys.alice, "bob": keys.bob}
        wrong = generate_key()
        for kind in ("bob", "none", "wrong", "alice", "admin"):
            # A fresh set for each caller: the cases end by deleting alice's session.
            owned = await make_owned(client, keys.alice)
            for case in cases(owned, keys.alice_id):
                if kind in ("none", "wrong"):
                    expected = 200 if case.path.split("?")[0] in OPEN else 401
                    key = None if kind == "none" else wrong
                else:
                    expected = getattr(case, kind)
                    key = callers[kind]
                sent = {**headers(key), **(case.extra_headers or {})}
                response = await client.request(
                    case.method, case.path, json=case.json, headers=sent
                )
                where = f"{kind}: {case.method} {case.path} {case.json}"
                assert response.status_code == expected, f"{where}: {response.text[:300]}"
                if expected in (401, 403, 404):
                    code = response.json()["error"]["code"]
                    assert code.endswith(
                        {401: "unauthorized", 403: "forbidden", 404: "not_found"}[expected]
                    ), where


async def test_a_user_key_sees_and_writes_only_its_own_user(
    make_app: AppFactory, keys: Keys
) -> None:
    async with make_app(api_keys_file=keys.path, **WEBHOOKS) as (client, _):
        alices = await make_owned(client, keys.alice)
        bobs = await make_owned(client, keys.bob)
        # Whatever the body said (nothing here), the session is the key's user's.
        session = await client.get(
            f"/api/v1/sessions/{alices.session_id}", headers=headers(keys.alice)
        )
        assert session.json()["user_id"] == keys.alice_id
        for key, mine, theirs in ((keys.alice, alices, bobs), (keys.bob, bobs, alices)):
            listed = (await client.get("/api/v1/sessions", headers=headers(key))).json()
            ids = {s["id"] for s in listed["sessions"]}
            assert mine.session_id in ids
            assert theirs.session_id not in ids
            sent = (await client.get("/api/v1/deliveries", headers=headers(key))).json()
            ids = {d["id"] for d in sent["deliveries"]}
            assert ids == {mine.delivery_id}
            assert sent["total"] == 1
        # The admin sees both users, and the sessions without a user stay apart.
        everything = (await client.get("/api/v1/deliveries", headers=headers(keys.admin))).json()
        assert {alices.delivery_id, bobs.delivery_id} <= {d["id"] for d in everything["deliveries"]}
        of_bob = await client.get(
            "/api/v1/sessions", params={"user_id": keys.bob_id}, headers=headers(keys.admin)
        )
        assert bobs.session_id in {s["id"] for s in of_bob.json()["sessions"]}
        # A session name is looked up among the key's user's sessions only.
        named = {"message_content": "x", "session_name": "chat"}
        for key in (keys.alice, keys.bob):
            r = await client.post("/api/v1/agent/echo/run", json=named, headers=headers(key))
            assert r.status_code == 200, r.text
        alice_chat = await client.get("/api/v1/sessions/chat", headers=headers(keys.alice))
        bob_chat = await client.get("/api/v1/sessions/chat", headers=headers(keys.bob))
        assert alice_chat.json()["user_id"] == keys.alice_id
        assert bob_chat.json()["user_id"] == keys.bob_id
        assert alice_chat.json()["id"] != bob_chat.json()["id"]
        # OpenAI's ``user`` is the key's user when the request leaves it out.
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        completion = await client.post("/v1/chat/completions", json=chat, headers=headers(keys.bob))
        session_id = completion.headers["X-Session-Id"]
        found = await client.get(f"/api/v1/sessions/{session_id}", headers=headers(keys.admin))
        assert found.json()["user_id"] == keys.bob_id


async def test_another_users_session_is_not_found_whatever_its_agent(
    make_app: AppFactory, keys: Keys
) -> None:
    """409 ``session_agent_mismatch`` would tell bob that alice's session exists."""
    async with make_app(api_keys_file=keys.path, **WEBHOOKS) as (client, _):
        alices = await make_owned(client, keys.alice)
        chat = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
        sent = {**headers(keys.bob), "X-Session-Id": alices.session_id}
        assert_error(
            await client.post("/v1/chat/completions", json=chat, headers=sent),
            404,
            "session_not_found",
        )
        run = {"message_content": "x", "session_id": alices.session_id}
        refused = await client.post(
            "/api/v1/agent/assistant/run", json=run, headers=headers(keys.bob)
        )
        assert_error(refused, 404, "session_not_found")


# -- the single THREADLINE_API_KEY --------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_single_api_key_is_an_admin_beside_the_file(
    make_app: AppFactory, keys: Keys
) -> None:
    async with make_app(api_key="s3cret", api_keys_file=keys.path, **WEBHOOKS) as (client, _):
        alices = await make_owned(client, keys.alice)
        for key in ("s3cret", keys.admin):
            found = await client.get(f"/api/v1/sessions/{alices.session_id}", headers=headers(key))
            assert found.status_code == 200, found.text
            assert (await client.get("/debug/metrics", headers=headers(key))).status_code == 200
        bearer = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/v1/models", headers=bearer)).status_code == 200


# -- rate limits --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_a_key_over_its_rate_limit_gets_429_with_retry_after(
    make_app: AppFactory, keys: Keys
) -> None:
    async with make_app(api_keys_file=keys.path) as (client, _):
        for _ in range(3):
            ok = await client.get("/api/v1/agents", headers=headers(keys.limited))
            assert ok.status_code == 200, ok.text
        refused = await client.get("/api/v1/agents", headers=headers(keys.limited))
        assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Under /v1, in OpenAI's shape.
        openai = await client.get("/v1/models", headers={"Authorization": f"Bearer {keys.limited}"})
        assert openai.status_code == 429
        assert openai.json()["error"]["type"] == "rate_limit_error"
        assert openai.json()["error"]["code"] == "rate_limited"
        assert "Retry-After" in openai.headers
        # The limit is the key's: another key of the same user is not held back.
        assert (await client.get("/api/v1/agents", headers=headers(keys.alice))).status_code == 200


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_the_rate_limit_holds_across_processes_with_redis(
    make_app: AppFactory, keys: Keys
) -> None:
    """Two apps (two processes' worth of state) share one Redis window."""
    settings = {"api_keys_file": keys.path}
    async with make_app(**settings) as (first, _), make_app(**settings) as (second, _):
        for client in (first, second, first):
            ok = await client.get("/api/v1/agents", headers=headers(keys.limited))
            assert ok.status_code == 200, ok.text
        assert_error(
            await second.get("/api/v1/agents", headers=headers(keys.limited)), 429, "rate_limited"
        )


# -- revocation ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_revoked_key_is_refused_without_a_restart(make_app: AppFactory, keys: Keys) -> None:
    async with make_app(api_keys_file=keys.path, api_keys_reload_s=0) as (client, _):
        assert (await client.get("/api/v1/agents", headers=headers(keys.bob))).status_code == 200
        [bob] = [name for name in await _names(keys.path) if name.startswith("bob-")]
        await asyncio.to_thread(revoke_key, keys.path, bob)
        refused = await client.get("/api/v1/agents", headers=headers(keys.bob))
        assert_error(refused, 401, "unauthorized")
        assert (await client.get("/api/v1/agents", headers=headers(keys.alice))).status_code == 200
        # A file that no longer parses keeps the keys read before: nobody is locked out.
        await asyncio.to_thread(keys.path.write_text, "[[keys]\nbroken")
        assert (await client.get("/api/v1/agents", headers=headers(keys.alice))).status_code == 200


async def _names(path: Path) -> list[str]:
    from threadline.keyfile import read_keys

    return [k.name for k in await asyncio.to_thread(read_keys, path)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_bad_key_file_fails_start_up(make_app: AppFactory, tmp_path: Path) -> None:
    from threadline.errors import ConfigError

    path = tmp_path / "keys.toml"
    entry = '[[keys]]\nname = "x"\nrole = "user"\nuser_id = "u"\nhash = "00"\n'
    await asyncio.to_thread(path.write_text, entry)
    with pytest.raises(ConfigError, match="hash must be 64"):
        async with make_app(api_keys_file=path):
            pass


# -- no route without a key --------------------------------------------------------------

OPEN_PREFIXES = ("/web", "/static-offline-docs")


def _walk(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    """Every route with its full path. FastAPI keeps an included router's routes in the
    router (``original_router``), under the prefix it was included with."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            nested = prefix + route.include_context.prefix  # type: ignore[attr-defined]
            yield from _walk(included.routes, nested)
        else:
            yield prefix + getattr(route, "path", ""), route


def _fill(path: str) -> str:
    # Any value of the right shape: the key is checked before the path's value matters.
    return re.sub(r"{[^}]+}", str(uuid.uuid4()), path)


@contextlib.asynccontextmanager
async def _remote(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as client:
        yield client


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_no_route_is_reachable_without_a_key(make_app: AppFactory, keys: Keys) -> None:
    """Every route of the app, called without a key (and with a wrong one): 401, but for the
    probes, the chat page and the static files. A route added later is checked too."""
    async with make_app(api_keys_file=keys.path, **WEBHOOKS) as (_, app), _remote(app) as client:
        seen = set()
        for path, route in _walk(app.routes):
            if isinstance(route, Mount):
                assert path in OPEN_PREFIXES, f"unexpected mount {path!r}"
                continue
            assert isinstance(route, Route), route
            for method in sorted((route.methods or set()) - {"HEAD"}):
                for sent in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                    response = await client.request(method, _fill(path), headers=sent)
                    if path in OPEN:
                        assert response.status_code == 200, (method, path)
                    else:
                        assert response.status_code == 401, (method, path, response.text)
                        assert response.headers["WWW-Authenticate"] == "X-API-Key"
                seen.add(f"{method} {path}")
        # The walk went into the included routers, nested ones too.
        assert {"POST /api/v1/deliveries/{delivery_id}/redeliver", "POST /v1/responses"} <= seen
        assert {"GET /openapi.json", "GET /docs", "POST /debug/metrics/reset"} <= seen
        # Unknown paths do not tell what exists.
        assert (await client.get("/api/v1/nowhere")).status_code == 401
        for path in ("/web/app.js", "/static-offline-docs/swagger-ui.css"):
            assert (await client.get(path)).status_code == 200, path
