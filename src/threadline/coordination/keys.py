"""Every Redis key and channel threadline uses, under one prefix. Names only: the Lua that
works on them is in ``scripts.py``.

No command ever scans keys: everything is addressed by session id or node id.
"""

from __future__ import annotations

from uuid import UUID

PREFIX = "threadline:"

# Broadcast: one message per answered (or failed) message id, for callers on any process.
ANSWERS_CHANNEL = f"{PREFIX}answers"

# Prefix of the per-process channels (``node_channel``); the NUDGE script appends the owner.
NODE_CHANNEL_PREFIX = f"{PREFIX}node:"

# Sorted set of leased sessions, scored by when their lease runs out (ms, Redis clock). A
# session whose score has passed while still listed lost its owner without a release (the
# process died): the watchdog of any process finds it here, without scanning keys.
ACTIVE = f"{PREFIX}active"

# Sorted set of inserts in flight into sessions another process owns (``session|token``),
# scored by when their NUDGE is overdue: an entry past due means the inserting process died
# between storing a message and telling the owner about it (see scripts.CLAIM).
INFLIGHT = f"{PREFIX}inflight"


def lease(session_id: UUID) -> str:
    """The token (``node:generation``) of the claim that owns a session's runner; expires
    unless renewed."""
    return f"{PREFIX}lease:{session_id}"


def dirty(session_id: UUID) -> str:
    """Set when a message reached a session whose lease is held: the owner must look again."""
    return f"{PREFIX}dirty:{session_id}"


def node_channel(node: str) -> str:
    """Direct messages to one process: "session S has a new message"."""
    return f"{NODE_CHANNEL_PREFIX}{node}"


# Run events (``events.py``): each session's recent events in a Redis stream (replayed to
# watchers that join late or resume), each also published on the session's channel for
# watchers that are live; every process listens to the channels by pattern.
EVENTS_CHANNEL_PREFIX = f"{PREFIX}events:"
EVENTS_PATTERN = f"{EVENTS_CHANNEL_PREFIX}*"


def events_log(session_id: UUID) -> str:
    return f"{PREFIX}eventlog:{session_id}"


def events_channel(session_id: UUID) -> str:
    return f"{EVENTS_CHANNEL_PREFIX}{session_id}"
