"""The OpenAPI document states what the server really does: every error status a route can
return, the one error body they all share, and the API key only when one is configured.

Routes declare their statuses with ``responses=errors(404, 503)``; the descriptions and the
body schema live here once. ``install`` then fits the generated document to the settings:
the ``X-API-Key`` requirement with its 401, 403 and 429 appear only when keys are configured
(``THREADLINE_API_KEY`` or ``THREADLINE_API_KEYS_FILE``), and
``webhook_url`` admits only the hosts ``THREADLINE_WEBHOOK_ALLOWED_HOSTS`` allows;
without a key, every route but ``/health`` may answer 403 instead (clients on other machines,
``api/access.py``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from threadline.api.access import OPEN_PATHS
from threadline.api.schemas import ErrorBody, OpenAIErrorBody
from threadline.config import Settings
from threadline.delivery.targets import url_schema

_ERRORS: dict[int, str] = {
    400: "The body is not parseable JSON (for example nested too deeply to parse).",
    401: "Missing or wrong API key (X-API-Key, or Authorization: Bearer under /v1).",
    403: (
        "No API key is configured and the client is not on the server's machine; or a user "
        "key sent another user's `user_id` (`forbidden`), or called an admin-only route."
    ),
    404: "No such agent, session or run, or no such path.",
    409: (
        "Strategy `reject` and the session already has a turn in flight "
        "(`session_busy`), the session belongs to another agent "
        "(`session_agent_mismatch`), a client cancelled the run that was answering "
        "(`run_cancelled`), or a cancel named a run that is not running (`run_not_active`)."
    ),
    413: "The body or `message_content` is over the configured limit.",
    422: (
        "The request does not match the schema, holds what no store can keep, or names a "
        "`webhook_url` this server may not call (`webhook_url_not_allowed`, "
        "`webhook_secret_unset`); or its idempotency key is refused "
        "(`invalid_idempotency_key`, `idempotency_key_reused`: sent before with another body)."
    ),
    429: (
        "The session already has SESSION_QUEUE_MAX unanswered messages (`queue_full`), or the "
        "API key is over its requests per minute (`rate_limited`); both with Retry-After."
    ),
    502: (
        "The run failed: the model provider (`model_error`), one of the agent's tools "
        "(`tool_error`) or threadline itself (`run_failed`). Its messages are answered by "
        "failure; GET /api/v1/runs/{run_id} says why."
    ),
    503: (
        "The store or Redis is unreachable, the server is shutting down, the agent's setup "
        "is failing (`agent_unavailable`, with Retry-After), or the answer is not available "
        "here yet (`answer_pending`)."
    ),
    504: "The model did not answer within MODEL_TIMEOUT_S.",
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`X-API-Key`"}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that can answer with these error statuses."""
    return {status: _response(status) for status in statuses}


def openai_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a /v1 route: the same statuses, in OpenAI's error shape."""
    return {status: _response(status, OpenAIErrorBody) for status in statuses}


def _response(status: int, model: type[Any] = ErrorBody) -> dict[str, Any]:
    response: dict[str, Any] = {"model": model, "description": _ERRORS.get(status, "")}
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
            app.openapi_schema = _fit(document, keyed=settings.keyed)
            # Which webhook URLs a request may name depends on the settings too.
            run_request = document["components"]["schemas"]["RunRequest"]["properties"]
            run_request["webhook_url"] = url_schema(
                settings.webhook_allowed_hosts, secret_set=settings.webhook_secret is not None
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fit(document: dict[str, Any], *, keyed: bool) -> dict[str, Any]:
    components = document.setdefault("components", {})
    for route, path in document.get("paths", {}).items():
        schema = "OpenAIErrorBody" if route.startswith("/v1/") else "ErrorBody"
        body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        unauthorized = {"description": _ERRORS[401], "headers": _HEADERS[401], "content": body}
        forbidden = {"description": _ERRORS[403], "content": body}
        too_many = {"description": _ERRORS[429], "headers": _HEADERS[429], "content": body}
        for operation in path.values():
            if route.startswith("/v1/"):
                # OpenAI's API refuses invalid requests with 400, never 422 (api/errors.py).
                operation["responses"].pop("422", None)
            if not keyed and route not in OPEN_PATHS:
                operation["responses"]["403"] = forbidden
            if "security" not in operation:
                continue
            if keyed:
                operation["responses"]["401"] = unauthorized
                operation["responses"]["403"] = forbidden
                operation["responses"]["429"] = too_many
            else:
                del operation["security"]
    if not keyed:
        components.pop("securitySchemes", None)
    if "#/components/schemas/HTTPValidationError" not in json.dumps(document["paths"]):
        # FastAPI's own 422 body, declared only for the 422s removed above.
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
    return document
