"""What the server sends for the chat page and the API docs, without a browser: every asset
they name is served here (no CDN), and the page follows the same access rules as the API."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.apps import AppFactory

pytestmark = pytest.mark.timeout(30)

LINKS = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")
IMPORTS = re.compile(r"""from\s+["'](\./[^"']+)["']""")


def links(html: str) -> list[str]:
    return [a or b for a, b in LINKS.findall(html)]


async def assert_served(client: httpx.AsyncClient, page: str) -> list[str]:
    """Every URL ``page`` names is a path of this server and answers 200; returns them."""
    response = await client.get(page)
    assert response.status_code == 200, response.text
    found = links(response.text)
    assert found
    for link in found:
        assert not re.match(r"^([a-z]+:)?//", link), f"{page} names another host: {link}"
        url = httpx.URL(page).join(link) if not link.startswith("/") else httpx.URL(link)
        asset = await client.get(str(url))
        assert asset.status_code == 200, f"{page} -> {link}: {asset.status_code}"
    return found


async def test_chat_page_and_its_modules_are_served_from_the_package(
    make_app: AppFactory,
) -> None:
    async with make_app() as (client, _):
        page = await client.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-cache"
        found = await assert_served(client, "/")
        assert "web/app.js" in found
        # The modules app.js imports, and theirs: every one is here, as JavaScript.
        todo, seen = ["app.js"], set()
        while todo:
            name = todo.pop()
            seen.add(name)
            module = await client.get(f"/web/{name}")
            assert module.status_code == 200, name
            assert module.headers["content-type"].startswith("text/javascript"), name
            todo += [i[2:] for i in IMPORTS.findall(module.text) if i[2:] not in seen]
        assert {"app.js", "chat.js", "api.js", "sse.js"} <= seen
        missing = await client.get("/web/nowhere.js")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_api_docs_need_no_network(make_app: AppFactory, page: str) -> None:
    async with make_app() as (client, _):
        found = await assert_served(client, page)
        assert "/openapi.json" in found
        assert not any("cdn" in link for link in found)


async def test_page_is_loopback_only_without_a_key(make_app: AppFactory) -> None:
    async with make_app() as (_, app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as far:
            for path in ("/", "/web/app.js", "/docs", "/static-offline-docs/swagger-ui.css"):
                assert (await far.get(path)).status_code == 403, path


async def test_page_loads_without_the_key_that_the_api_needs(make_app: AppFactory) -> None:
    # The page must load to ask for the key; the API behind it refuses requests without it.
    async with make_app(api_key="s3cret-key") as (client, _):
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/web/app.js")).status_code == 200
        assert (await client.get("/api/v1/agents")).status_code == 401
        keyed = await client.get("/api/v1/agents", headers={"X-API-Key": "s3cret-key"})
        assert keyed.status_code == 200
