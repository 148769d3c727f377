"""Which webhook URLs a request may name: http(s) to a host the operator allowed.

A client-supplied URL makes the server send requests on the client's behalf, so without a
list anyone could point it at internal addresses (metadata services, admin ports). The list,
``THREADLINE_WEBHOOK_ALLOWED_HOSTS``, holds ``host`` (any port) or ``host:port`` entries; an
empty list refuses every request URL. An agent's own ``webhook_url`` is the operator's and is
not checked against it.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

from threadline.errors import WebhookNotAllowed, WebhookSecretUnset

SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def check_webhook_url(url: str, allowed_hosts: Collection[str], *, secret_set: bool) -> str:
    """Return ``url`` if a request may name it; raise ``WebhookNotAllowed`` (422) otherwise."""
    if not secret_set:
        raise WebhookSecretUnset(
            "webhook_url needs THREADLINE_WEBHOOK_SECRET on the server: deliveries are signed"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookNotAllowed(f"webhook_url {url!r} is not a valid URL") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in SCHEMES or not host:
        raise WebhookNotAllowed(f"webhook_url {url!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookNotAllowed(f"webhook_url {url!r} must not hold credentials")
    effective = port if port is not None else DEFAULT_PORTS[parts.scheme]
    named = host if ":" not in host else f"[{host}]"  # IPv6 literals as written in URLs
    if host in allowed_hosts or named in allowed_hosts or f"{named}:{effective}" in allowed_hosts:
        return url
    raise WebhookNotAllowed(f"webhook_url host {host!r} is not in THREADLINE_WEBHOOK_ALLOWED_HOSTS")


def check_agent_url(agent: str, url: str) -> None:
    """An agent's default URL: any host (the operator chose it), but http(s) only."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"agent {agent!r}: webhook_url {url!r} must be an http(s) URL")
