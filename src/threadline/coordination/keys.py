"""Every Redis key and channel threadline uses, under one prefix. Names only: the Lua that
works on them is in ``scripts.py``.

No command ever scans keys: everything is addressed by session id, node id or bucket number.

Cluster-ready: a Redis Cluster runs a script only if every key it touches hashes to one slot,
and the slot of a key with a ``{hash tag}`` is the slot of the tag alone. So each session's keys
share the tag ``{<session id>}`` (lease, dirty mark, event log: one slot per session), a
process's channel the tag ``{<node>}``, and the orphan index is ``N_BUCKETS`` sorted sets per
kind, each tagged with its number (``threadline:active:{3}``): spread over the cluster, none
hot, each scanned by one short script. A session's lease and its bucket are in different
slots, so no script touches both: see ``leases.py`` for the order that makes this safe.
"""

from __future__ import annotations

import zlib
from uuid import UUID

PREFIX = "threadline:"

# The orphan index is split into this many buckets per kind (fixed: every process must agree
# on a session's bucket; changing it strands the entries of the old buckets until the
# sessions' next message).
N_BUCKETS = 16


def bucket(session_id: UUID) -> int:
    """The bucket of a session's index entries: a hash of its id every process computes
    alike."""
    return zlib.crc32(session_id.bytes) % N_BUCKETS


def active(i: int) -> str:
    """Bucket ``i`` of the sorted set of leased sessions, scored by when their lease runs out
    (ms, Redis clock). A session whose score has passed while still listed lost its owner
    without a release (the process died): the watchdog of any process finds it here, without
    scanning keys."""
    return f"{PREFIX}active:{{{i}}}"


def inflight(i: int) -> str:
    """Bucket ``i`` of the sorted set of inserts in flight into sessions another process owns
    (``session|token``), scored by when their NUDGE is overdue: an entry past due means the
    inserting process died between storing a message and telling the owner about it."""
    return f"{PREFIX}inflight:{{{i}}}"


def lease(session_id: UUID) -> str:
    """The token (``node:generation``) of the claim that owns a session's runner; expires
    unless renewed."""
    return f"{PREFIX}{{{session_id}}}:lease"


def dirty(session_id: UUID) -> str:
    """Set when a message reached a session whose lease is held: the owner must look again."""
    return f"{PREFIX}{{{session_id}}}:dirty"


def node_channel(node: str) -> str:
    """Direct messages to one process: "session S has a new message", and the answers its
    callers wait for (only those: the process that stored a message names itself in it)."""
    return f"{PREFIX}node:{{{node}}}"


# Run events (``events.py``): each session's recent events in a Redis stream (replayed to
# watchers that join late or resume), each also published on the session's channel for
# watchers that are live. A process listens to a session's channel only while it has a
# watcher of that session. Log and channel share the session's hash tag: the script that
# appends and publishes touches one cluster slot.
def events_log(session_id: UUID) -> str:
    return f"{PREFIX}{{{session_id}}}:eventlog"


def events_channel(session_id: UUID) -> str:
    return f"{PREFIX}{{{session_id}}}:events"
