"""The OpenAPI document states what the server really does: every error status a route can
return, the one error body they all share, and the API key only when one is configured.

Routes declare their statuses with ``responses=errors(404, 503)``; the descriptions and the
body schema live here once. ``install`` then fits the generated document to the settings:
the ``X-API-Key`` requirement and its 401 appear only when ``THREADLINE_API_KEY`` is set,
since without a key the server accepts every request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from threadline.api.schemas import ErrorBody
from threadline.config import Settings

_ERRORS: dict[int, str] = {
    400: "The body is not parseable JSON (for example nested too deeply to parse).",
    401: "Missing or wrong X-API-Key header.",
    404: "No such agent, session or run, or no such path.",
    409: "Strategy `reject` and the session already has a turn in flight.",
    413: "The body or `message_content` is over the configured limit.",
    422: "The request does not match the schema, or holds what no store can keep.",
    429: "The session already has SESSION_QUEUE_MAX unanswered messages.",
    502: "The model failed while answering.",
    503: "The store or Redis is unreachable, or the server is shutting down.",
    504: "The model did not answer within MODEL_TIMEOUT_S.",
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`X-API-Key`"}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that can answer with these error statuses."""
    return {status: _response(status) for status in statuses}


def _response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorBody, "description": _ERRORS[status]}
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the document fitted to ``settings`` at /openapi.json (built once, on demand)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = _fit(document, keyed=settings.api_key is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fit(document: dict[str, Any], *, keyed: bool) -> dict[str, Any]:
    components = document.setdefault("components", {})
    unauthorized = {
        "description": _ERRORS[401],
        "headers": _HEADERS[401],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if "security" not in operation:
                continue
            if keyed:
                operation["responses"]["401"] = unauthorized
            else:
                del operation["security"]
    if not keyed:
        components.pop("securitySchemes", None)
    return document
