"""The chat page: plain HTML, CSS and JavaScript modules shipped inside the package.

``install`` serves ``static/index.html`` at ``/`` and the rest of ``static/`` under ``/web``.
Nothing is built and nothing is fetched from elsewhere at run time: the page talks to
``/api/v1`` only (and the Content-Security-Policy says so to the browser). Like every other
path, the page is for loopback clients only when no API key is set (``api/access.py``); with a
key, the page itself is public and asks for the key on the first 401 of the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# Same-origin only: no CDN, no inline script, no framing by another site.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


def install(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its assets under ``/web``."""
    app.mount("/web", StaticFiles(directory=STATIC), name="web")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        # no-cache: revalidate (ETag), so a new server version's page is never stale.
        headers = {**HEADERS, "Cache-Control": "no-cache"}
        return FileResponse(STATIC / "index.html", headers=headers, media_type="text/html")
