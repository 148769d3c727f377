"""Who may talk to a server that has no API key: clients on this machine only.

Without ``THREADLINE_API_KEY`` nothing authenticates a request, so the app itself refuses
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

from starlette.types import ASGIApp, Receive, Scope, Send

from threadline.api.errors import Forbidden, error_for_path

OPEN_PATHS = frozenset({"/health"})


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
            "THREADLINE_API_KEY is unset, so this server answers only clients on its own "
            "machine; set an API key to serve others",
        )
        await response(scope, receive, send)
