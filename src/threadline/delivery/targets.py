"""Which webhook URLs a request may name: http(s) to a host the operator allowed.

A client-supplied URL makes the server send requests on the client's behalf, so without a
list anyone could point it at internal addresses (metadata services, admin ports). The list,
``THREADLINE_WEBHOOK_ALLOWED_HOSTS``, holds ``host`` (any port) or ``host:port`` entries; an
empty list refuses every request URL. An agent's own ``webhook_url`` is the operator's and is
not checked against it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from threadline.errors import WebhookNotAllowed, WebhookSecretUnset

SCHEMES = frozenset({"http", "https"})
# 0-65535, as a regular expression.
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
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


def url_schema(allowed_hosts: Collection[str], *, secret_set: bool) -> dict[str, Any]:
    """The JSON schema of a request's ``webhook_url`` under these settings, for the OpenAPI
    document: null only when every URL would be refused, else a pattern naming the allowed
    hosts (``check_webhook_url`` stays the judge; the pattern tells clients and fuzzers)."""
    if not secret_set or not allowed_hosts:
        return {
            "type": "null",
            "title": "Webhook Url",
            "description": "Refused: this server has no webhook secret or no allowed hosts.",
        }
    choices = []
    for entry in sorted(allowed_hosts):
        host, sep, port = entry.rpartition(":") if not entry.endswith("]") else ("", "", "")
        if not sep or not port.isdigit():
            choices.append(rf"https?://{re.escape(entry)}(?::{_PORT})?")
            continue
        choices.append(rf"https?://{re.escape(host)}:{port}")
        for scheme, default in DEFAULT_PORTS.items():
            if int(port) == default:
                choices.append(rf"{scheme}://{re.escape(host)}")
    pattern = rf"^(?:{'|'.join(choices)})(?:[/?#][^\x00]*)?$"
    return {
        "anyOf": [{"type": "string", "maxLength": 2000, "pattern": pattern}, {"type": "null"}],
        "title": "Webhook Url",
        "description": "POST the reply here (signed); the host must be one the server allows.",
    }
