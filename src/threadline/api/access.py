"""Who may do what: the caller a key names, and the two gates every request passes first.

With keys (``THREADLINE_API_KEY`` and/or ``THREADLINE_API_KEYS_FILE``), ``KeyRequired`` answers
401 to a request without a valid key on every path but ``OPEN_WITH_KEYS`` (probes, the chat
page and static assets, which hold no data), 429 with ``Retry-After`` past the key's rate
limit, and otherwise hands the ``Caller`` on in ``scope["state"]``. Routes then ask the caller
(``api/deps.py``, ``CallerDep``): an admin sees everything; a user key sees only its user's
sessions and what hangs off them (runs, messages, events, deliveries), and another user's
is 404, as if it did not exist; a ``user_id`` (or OpenAI ``user``) naming another user is 403.

Without any key nothing authenticates a request, so ``LoopbackOnly`` refuses
every peer that is not loopback with 403, whatever address the server was bound to (``threadline
serve`` refuses a non-loopback host, but ``uvicorn --factory threadline.app:create_app --host
0.0.0.0`` does not go through it).

This is ASGI middleware rather than a route dependency because it must cover every path:
``/docs``, ``/openapi.json``, unknown paths and any route added later, not only the routers
that remember to declare it. Only ``/health`` stays open, so a liveness probe works; it
reveals nothing.

The peer is ``scope["client"]``, the address of the TCP connection. ``X-Forwarded-For`` is
never read here: anyone can send it. (uvicorn rewrites ``client`` from that header only for
proxies it was told to trust, ``--forwarded-allow-ips``, and then the rewritten address is
the real client's, which is what should be judged.) A connection without a peer address is a
Unix socket, which only local users can reach.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from threadline.api.errors import Forbidden, RateLimited, Unauthorized, error_for_path

if TYPE_CHECKING:
    from threadline.api.gate import Gate
    from threadline.store import Session

OPEN_PATHS = frozenset({"/health"})
# With keys: liveness, readiness, and the files of the chat page and of the API docs' page
# (the pages ask for a key; the API behind them refuses requests without one).
OPEN_WITH_KEYS = frozenset({"/health", "/ready", "/"})
OPEN_PREFIXES_WITH_KEYS = ("/web/", "/static-offline-docs/")


@dataclass(frozen=True, slots=True)
class Caller:
    """Whoever bears the request's key: an admin, or a user key bound to ``user_id``."""

    role: Literal["admin", "user"]
    user_id: str | None
    key_name: str
    rate_limit_per_min: int = 0

    def user_for(self, requested: str | None, field: str = "user_id") -> str | None:
        """The user a request acts for: a user key's own, whatever it sent (403 if it sent
        another); an admin's is what it sent."""
        if self.role == "admin":
            return requested
        if requested is not None and requested != self.user_id:
            raise Forbidden(f"this key acts for user {self.user_id!r}; {field} may not differ")
        return self.user_id

    def sees(self, session: Session) -> bool:
        """Whether the session exists for this caller (another user's is "not found")."""
        return self.role == "admin" or session.user_id == self.user_id

    def require_admin(self) -> None:
        if self.role != "admin":
            raise Forbidden("this route needs an admin key")


# Without keys, every caller the loopback rule admits is an admin.
LOCAL = Caller("admin", None, "loopback")


def is_open_with_keys(path: str) -> bool:
    return path in OPEN_WITH_KEYS or path.startswith(OPEN_PREFIXES_WITH_KEYS)


def presented_key(headers: Headers) -> str | None:
    """``X-API-Key``, or OpenAI's clients' ``Authorization: Bearer``."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


class KeyRequired:
    """401 without a valid key, 429 past its rate limit; the ``Caller`` in the scope's state.

    Middleware, like ``LoopbackOnly``, so that it covers every path: the docs, unknown paths
    and any route added later. The gate lives in the lifespan (``Services.gate``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_open_with_keys(scope["path"]):
            await self.app(scope, receive, send)
            return
        gate: Gate = scope["app"].state.services.gate
        caller = await gate.caller(presented_key(Headers(scope=scope)))
        if caller is None:
            headers = {"WWW-Authenticate": "X-API-Key"}
            refusal = (401, Unauthorized.code, "missing or invalid API key", headers)
            await _refuse(scope, receive, send, *refusal)
            return
        retry_after = await gate.admit(caller)
        if retry_after is not None:
            message = (
                f"key {caller.key_name!r} is over its {caller.rate_limit_per_min} requests per "
                f"minute; retry in {retry_after} s"
            )
            headers = {"Retry-After": str(retry_after)}
            await _refuse(scope, receive, send, 429, RateLimited.code, message, headers)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str],
) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting refuses the handshake; the server answers it with 403.
        await send({"type": "websocket.close", "code": 1008})
        return
    response = error_for_path(scope["path"], status, code, message, headers)
    await response(scope, receive, send)


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name, not an address: nothing vouches for it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack socket
    return address.is_loopback


class LoopbackOnly:
    """Answer 403 ``forbidden`` to any HTTP or WebSocket peer that is not loopback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if client is None or is_loopback(client[0]):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accepting refuses the handshake; the server answers it with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        response = error_for_path(
            scope["path"],
            403,
            Forbidden.code,
            "no API key is configured, so this server answers only clients on its own "
            "machine; set THREADLINE_API_KEY or THREADLINE_API_KEYS_FILE to serve others",
        )
        await response(scope, receive, send)
