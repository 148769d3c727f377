"""How a delivery is signed, and how a receiver checks it.

Three headers go with every POST::

    Threadline-Webhook-Id:        the delivery id (the same on every retry: dedupe on it)
    Threadline-Webhook-Timestamp: Unix seconds when this attempt was signed
    Threadline-Webhook-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

The timestamp is signed with the body so that a captured request cannot be replayed later
than the receiver's tolerance; ``v1=`` names the scheme so that a later one can be sent next
to it during a key or algorithm change.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

ID_HEADER = "Threadline-Webhook-Id"
TIMESTAMP_HEADER = "Threadline-Webhook-Timestamp"
SIGNATURE_HEADER = "Threadline-Webhook-Signature"
SCHEME = "v1"
# How old a signed request a receiver should accept (``verify``'s default).
TOLERANCE_S = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def signed_headers(secret: str, delivery_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether ``body`` with these headers was signed with ``secret`` within ``tolerance_s``.

    ``headers`` must look names up case-insensitively (Starlette's and httpx's do). The same
    check, in a receiver's own code, is in the README.
    """
    stamp = headers.get(TIMESTAMP_HEADER, "")
    sent = headers.get(SIGNATURE_HEADER, "")
    if not stamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_s:
        return False
    expected = signature(secret, int(stamp), body)
    # Several signatures may be sent, space-separated (a secret being rotated).
    return any(hmac.compare_digest(expected, candidate) for candidate in sent.split())
