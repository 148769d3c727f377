"""``RequestTelemetry``: the request id, the per-request log line and the HTTP metrics.

A pure ASGI middleware (no ``BaseHTTPMiddleware``: that would run the route in another task,
and the ids a route binds would not come back here). For each HTTP request it

* takes the client's ``X-Request-Id`` (printable, at most 128 characters) or makes one, puts it
  in the log context and echoes it in the response's ``X-Request-Id`` header;
* counts the request and times it by *route template* (``/api/v1/runs/{run_id}``), never the
  raw path, so ids in paths cannot blow up the number of series; paths no route matches are
  ``unmatched``;
* counts Server-Sent Events responses open (``text/event-stream``);
* logs one line when the response ends: method, route, status, latency, and the request,
  session and run ids; at INFO, or WARNING for a 5xx (a client's 4xx is not the server's
  problem).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline import logs, metrics

log = logging.getLogger("threadline.requests")

HEADER = b"x-request-id"
UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The matched route's path template, after routing has filled ``scope["route"]``."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    # A mount (the web page's static files) matches a whole subtree: keep its prefix only.
    return path if getattr(route, "routes", None) is None else path + "/*"


def _find_route(scope: Scope) -> str:
    """For responses sent before routing ran (a refused peer, a body over the limit)."""
    app: Any = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route_template({**scope, **child, "route": route})
    return UNMATCHED


class RequestTelemetry:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        header = dict(scope["headers"]).get(HEADER)
        rid = logs.request_id(header.decode("latin-1") if header is not None else None)
        # Not reset when the request ends: uvicorn runs each request in a task of its own, and
        # the error handler that logs an unexpected exception's traceback runs after us.
        context = logs.scope(request_id=rid)
        status = 500
        stream_route: str | None = None

        async def sending(message: Message) -> None:
            nonlocal status, stream_route
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((HEADER, rid.encode()))
                message = {**message, "headers": headers}
                if any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in headers
                ):
                    stream_route = self._route(scope)
                    metrics.STREAMS_OPEN.labels(stream_route).inc()
            await send(message)

        failed: BaseException | None = None
        try:
            await self.app(scope, receive, sending)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if stream_route is not None:
                metrics.STREAMS_OPEN.labels(stream_route).dec()
            self._record(scope, status, time.perf_counter() - start, context, failed)

    @staticmethod
    def _route(scope: Scope) -> str:
        return route_template(scope) if "route" in scope else _find_route(scope)

    def _record(
        self,
        scope: Scope,
        status: int,
        elapsed: float,
        context: logs.LogContext,
        failed: BaseException | None,
    ) -> None:
        route = self._route(scope)
        method = scope["method"]
        path_params = scope.get("path_params") or {}
        if context.run_id is None and "run_id" in path_params:
            context.run_id = str(path_params["run_id"])
        labels = (method, route, str(status))
        metrics.HTTP_REQUESTS.labels(*labels).inc()
        metrics.HTTP_DURATION.labels(*labels).observe(elapsed)
        latency_ms = round(elapsed * 1000, 2)
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(
            level,
            "%s %s %d %.1fms%s",
            method,
            route,
            status,
            latency_ms,
            f" ({type(failed).__name__})" if failed is not None else "",
            extra={
                "method": method,
                "route": route,
                "path": scope["path"],
                "status": status,
                "latency_ms": latency_ms,
                "request_id": context.request_id,
                "session_id": context.session_id,
                "run_id": context.run_id,
            },
        )
