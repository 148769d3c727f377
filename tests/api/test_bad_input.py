"""Input a database cannot store gets a 422 naming the field, the same on every store.

Each case here was a 500 on PostgreSQL (issue 8): text with NUL, JSON that jsonb refuses
(NUL, NaN, Infinity) and pages whose offset overflows 64 bits. SQLite would have stored some
of them; the API rejects them on both, so that a client sees one behaviour.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.apps import AppFactory

RUN = "/api/v1/agent/echo/run"


def assert_422(response: httpx.Response, *field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "validation_error"
    where = ".".join(field)
    assert error["message"].startswith(f"{where}:"), error["message"]
    return error


async def post_raw(client: httpx.AsyncClient, text: str) -> httpx.Response:
    """Send a JSON body as written: ``json=`` would refuse NaN or escape what we test."""
    return await client.post(RUN, content=text, headers={"content-type": "application/json"})


async def session_count(client: httpx.AsyncClient) -> int:
    # The PostgreSQL database is shared with other tests: compare counts, not zero.
    total: int = (await client.get("/api/v1/sessions")).json()["total"]
    return total


@pytest.mark.parametrize("field", ["message_content", "session_name", "user_id"])
async def test_nul_in_body_text_is_422_naming_the_field(make_app: AppFactory, field: str) -> None:
    body = {"message_content": "hi", field: "a\u0000b"}
    async with make_app() as (client, _):
        before = await session_count(client)
        error = assert_422(await client.post(RUN, json=body), field)
        assert "NUL" in error["message"]
        # Nothing was stored: the bad request did not leave a session behind.
        assert await session_count(client) == before


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/sessions?user_id=a%00b", ("query", "user_id")),
        ("/api/v1/sessions/a%00b", ("path", "id_or_name")),
        ("/api/v1/sessions/chat?user_id=a%00b", ("query", "user_id")),
    ],
)
async def test_nul_in_query_or_path_is_422_naming_the_parameter(
    make_app: AppFactory, path: str, field: tuple[str, ...]
) -> None:
    async with make_app() as (client, _):
        assert_422(await client.get(path), *field)
        if "/sessions/" in path:
            assert_422(await client.delete(path), *field)


@pytest.mark.parametrize("field", ["channel_payload", "context"])
@pytest.mark.parametrize(
    ("value", "where"),
    [
        ('{"k": "a\\u0000b"}', ["k"]),
        ('{"a\\u0000b": 1}', []),
        ('{"deep": [1, {"x": ["ok", "\\u0000"]}]}', ["deep", "1", "x", "1"]),
        ('{"n": NaN}', ["n"]),
        ('{"n": Infinity}', ["n"]),
        ('{"n": [-Infinity]}', ["n", "0"]),
    ],
)
async def test_json_that_jsonb_refuses_is_422_naming_the_field(
    make_app: AppFactory, field: str, value: str, where: list[str]
) -> None:
    async with make_app() as (client, _):
        text = f'{{"message_content": "hi", "{field}": {value}}}'
        before = await session_count(client)
        error = assert_422(await post_raw(client, text), field)
        assert error["details"][0]["loc"] == ["body", field]
        # The message says where inside the object, as a JSON Pointer.
        assert f" at /{'/'.join(where)}" in error["message"], error["message"]
        assert await session_count(client) == before


async def test_lone_surrogate_is_422_not_an_encoding_fault(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        assert_422(await post_raw(client, '{"message_content": "a\\ud800b"}'), "message_content")
        text = '{"message_content": "hi", "channel_payload": {"k": "\\udfff"}}'
        error = assert_422(await post_raw(client, text), "channel_payload")
        assert "surrogate at /k" in error["message"]


async def test_storable_json_is_kept_as_sent(make_app: AppFactory) -> None:
    payload = {"s": "é ✓ 𝄞", "n": [1, -2.5, 1e300, True, None], "o": {"": {}}}
    async with make_app() as (client, _):
        r = await client.post(RUN, json={"message_content": "hi", "channel_payload": payload})
        assert r.status_code == 200, r.text
        assert json.loads(json.dumps(payload)) == payload


@pytest.mark.parametrize("route", ["/api/v1/sessions", "/api/v1/sessions/{id}"])
@pytest.mark.parametrize(
    "query",
    [
        "page=99999999999999999999",
        "page=9223372036854775807&page_size=500",
        "page=18446744073709551616&page_size=1",
    ],
)
async def test_page_whose_offset_overflows_is_422(
    make_app: AppFactory, route: str, query: str
) -> None:
    async with make_app() as (client, _):
        created = await client.post(RUN, json={"message_content": "hi"})
        path = route.format(id=created.json()["session_id"])
        assert_422(await client.get(f"{path}?{query}"), "query", "page")


@pytest.mark.parametrize("route", ["/api/v1/sessions", "/api/v1/sessions/{id}"])
async def test_the_last_page_that_fits_is_served_empty(make_app: AppFactory, route: str) -> None:
    async with make_app() as (client, _):
        created = await client.post(RUN, json={"message_content": "hi"})
        path = route.format(id=created.json()["session_id"])
        schema = (await client.get("/openapi.json")).json()
        get = schema["paths"][route.replace("{id}", "{id_or_name}")]["get"]
        (page,) = (p for p in get["parameters"] if p["name"] == "page")
        size = next(p for p in get["parameters"] if p["name"] == "page_size")
        last = page["schema"]["maximum"]
        biggest = size["schema"]["maximum"]
        r = await client.get(path, params={"page": last, "page_size": biggest})
        assert r.status_code == 200, r.text
        assert r.json()["page"] == last


async def test_unknown_session_with_nul_free_name_is_still_404(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        r = await client.get(f"/api/v1/sessions/{uuid.uuid4()}-x")
        assert r.status_code == 404, r.text


@pytest.mark.parametrize(("depth", "status"), [(64, 200), (65, 422), (5000, 400)])
async def test_deep_json_is_refused_with_a_4xx(
    make_app: AppFactory, depth: int, status: int
) -> None:
    # 65 levels: refused by the payload rules; 5000: beyond what Python's parser recurses
    # into, which FastAPI reports as an unparseable body.
    nested = '{"k": ' * depth + "1" + "}" * depth
    async with make_app() as (client, _):
        r = await post_raw(client, f'{{"message_content": "hi", "channel_payload": {nested}}}')
        assert r.status_code == status, r.text
        if status == 422:
            assert "deeper than 64 levels" in r.json()["error"]["message"]
        if status == 400:
            assert r.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    "body",
    [
        {"message_content": "hi", "message_limit": False},
        {"message_content": "hi", "message_limit": 1.5},
        {"message_content": "hi", "message_limit": "5"},
        {"message_content": "hi", "user_id": True},
        {"message_content": "hi", "user_id": "u" * 201},
        {"message_content": " \t\n"},
    ],
)
async def test_values_the_schema_forbids_are_not_coerced(
    make_app: AppFactory, body: dict[str, Any]
) -> None:
    # The document says integer (or string); pydantic's lax mode would have turned false
    # into 0 and true into "True", accepting what the contract promises to reject.
    async with make_app() as (client, _):
        r = await client.post(RUN, json=body)
        assert r.status_code == 422, r.text


async def test_an_integral_float_is_a_json_integer(make_app: AppFactory) -> None:
    # JSON Schema's integer includes 3.0; the document must not promise what we refuse.
    async with make_app() as (client, _):
        r = await client.post(RUN, json={"message_content": "hi", "message_limit": 3.0})
        assert r.status_code == 200, r.text


async def test_integer_user_ids_are_still_accepted_as_text(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        r = await client.post(RUN, json={"message_content": "hi", "user_id": 42})
        assert r.status_code == 200, r.text
        detail = (await client.get(f"/api/v1/sessions/{r.json()['session_id']}")).json()
        assert detail["user_id"] == "42"


async def test_405_lists_every_method_the_path_supports(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        r = await client.request("OPTIONS", "/api/v1/sessions/anything")
        assert r.status_code == 405, r.text
        assert r.json()["error"]["code"] == "method_not_allowed"
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert {"GET", "DELETE"} <= allowed
