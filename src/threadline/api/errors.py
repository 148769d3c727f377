"""The one place where errors become HTTP responses: ``{"error": {"code", "message", ...}}``.

Under ``/v1`` (the OpenAI-compatible API) the same errors take OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and a request the schema refuses is 400
there, as OpenAI answers it, not 422.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from threadline.errors import (
    AgentUnavailable,
    BadParameter,
    CoordinatorUnavailable,
    InvalidRequest,
    ModelError,
    ModelTimeout,
    NotFound,
    QueueFull,
    RunCancelled,
    RunFailed,
    RunNotActive,
    SessionAgentMismatch,
    SessionBusy,
    StoreUnavailable,
    ThreadlineError,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS: list[tuple[type[ThreadlineError], int]] = [
    (BadParameter, 400),
    (InvalidRequest, 422),
    (NotFound, 404),
    (SessionBusy, 409),
    (SessionAgentMismatch, 409),
    (RunNotActive, 409),
    (RunCancelled, 409),
    (QueueFull, 429),
    (Unavailable, 503),
    (ModelTimeout, 504),
    (ModelError, 502),
    (RunFailed, 502),
]


class PayloadTooLarge(ThreadlineError):
    code = "payload_too_large"


class Unauthorized(ThreadlineError):
    code = "unauthorized"


class Forbidden(ThreadlineError):
    code = "forbidden"


class RateLimited(ThreadlineError):
    """A key over its requests per minute (``api/access.py`` answers it, with Retry-After)."""

    code = "rate_limited"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": body}, status_code=status, headers=headers)


OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def _openai_type(status: int) -> str:
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error_body(exc: BaseException) -> dict[str, Any]:
    """An error as an OpenAI stream tells it, once the response has begun."""
    body = error_body(exc)
    status = next((s for kind, s in STATUS if isinstance(exc, kind)), 500)
    return {
        "message": body["message"],
        "type": _openai_type(status),
        "param": None,
        "code": body["code"],
    }


def openai_error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape; the type follows the status as OpenAI's do."""
    body = {"message": message, "type": _openai_type(status), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def error_for_path(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in the shape of the API that ``path`` belongs to (for middleware)."""
    if path.startswith(OPENAI_PREFIX):
        return openai_error(status, code, message, headers)
    return error_response(status, code, message, headers)


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PREFIX):
        return openai_error(status, code, message, headers, extra.get("param"))
    return error_response(status, code, message, headers, **extra)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ThreadlineError)
    if isinstance(exc, PayloadTooLarge):
        return _respond(request, 413, exc.code, str(exc))
    if isinstance(exc, Unauthorized):
        return _respond(request, 401, exc.code, str(exc), {"WWW-Authenticate": "X-API-Key"})
    if isinstance(exc, Forbidden):
        return _respond(request, 403, exc.code, str(exc))
    status = next((s for kind, s in STATUS if isinstance(exc, kind)), 500)
    headers = None
    extra: dict[str, Any] = {}
    if isinstance(exc, QueueFull | AgentUnavailable):
        headers = {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, SessionBusy | RunFailed) and exc.run_id is not None:
        extra["run_id"] = str(exc.run_id)
    if status == 500:
        log.error("unmapped domain error: %r", exc)
    message = str(exc)
    if isinstance(exc, StoreUnavailable | CoordinatorUnavailable):
        # The driver's words (hosts, states, SQL errors) go to the log, not to the client.
        log.warning("%s on %s %s: %s", exc.code, request.method, request.url.path, exc)
        message = _UNAVAILABLE_MESSAGE[exc.code]
    if isinstance(exc, BadParameter):
        extra["param"] = exc.param
    return _respond(request, status, exc.code, message, headers, **extra)


_UNAVAILABLE_MESSAGE = {
    StoreUnavailable.code: "the database is unavailable; retry later",
    CoordinatorUnavailable.code: "the coordination service is unavailable; retry later",
}


def error_body(exc: BaseException) -> dict[str, str]:
    """An error as a stream tells it (``{"code", "message"}``), once the response has begun and
    no status can say it: the same codes and safe messages as the JSON errors above."""
    if isinstance(exc, StoreUnavailable | CoordinatorUnavailable):
        log.warning("%s in a stream: %s", exc.code, exc)
        return {"code": exc.code, "message": _UNAVAILABLE_MESSAGE[exc.code]}
    if isinstance(exc, ThreadlineError):
        return {"code": exc.code, "message": str(exc)}
    log.error("unexpected error in a stream", exc_info=exc)
    return {"code": "internal_error", "message": "internal server error"}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    message = f"{where}: {first['msg']}"
    if request.url.path.startswith(OPENAI_PREFIX):
        if first.get("type") == "extra_forbidden":
            message = f"{where!r} is not supported by this server"
            return openai_error(400, "unsupported_parameter", message, param=where)
        return openai_error(400, "invalid_value", message, param=where or None)
    return error_response(422, "validation_error", message, details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette lists the methods of the first route whose path matched; a path served by
        # several routes (GET and DELETE /sessions/{id}) allows the methods of all of them.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return _respond(request, exc.status_code, code, str(exc.detail), headers)


def _allowed_methods(request: Request) -> list[str]:
    # Ask the routes, each method in turn: included routers nest routes, and ``matches`` is
    # the one public question every kind of route answers.
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    if isinstance(exc, OSError | ConnectionError):
        return _respond(request, 503, "unavailable", "a dependency is unreachable")
    return _respond(request, 500, "internal_error", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ThreadlineError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
