"""Every Redis key and channel threadline uses, under one prefix. Names only: the Lua that
works on them is in ``scripts.py``.

No command ever scans keys: everything is addressed by session id or node id.
"""

from __future__ import annotations

from uuid import UUID

PREFIX = "threadline:"

# A per-process channel is its node id between these (``node_channel``); the NUDGE script
# builds the owner's from them.
NODE_CHANNEL_PREFIX = f"{PREFIX}node:{{"
NODE_CHANNEL_SUFFIX = "}"

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
    """Direct messages to one process: "session S has a new message", and the answers its
    callers wait for (only those: the process that stored a message names itself in it)."""
    return f"{NODE_CHANNEL_PREFIX}{node}{NODE_CHANNEL_SUFFIX}"


# Run events (``events.py``): each session's recent events in a Redis stream (replayed to
# watchers that join late or resume), each also published on the session's channel for
# watchers that are live. A process listens to a session's channel only while it has a
# watcher of that session. Log and channel share the session's hash tag: the script that
# appends and publishes touches one cluster slot.
def events_log(session_id: UUID) -> str:
    return f"{PREFIX}{{{session_id}}}:eventlog"


def events_channel(session_id: UUID) -> str:
    return f"{PREFIX}{{{session_id}}}:events"
