"""Every Redis key and channel threadline uses, under one prefix, and the Lua for atomic steps.

No command ever scans keys: everything is addressed by session id or node id.
"""

from __future__ import annotations

from uuid import UUID

PREFIX = "threadline:"

# Broadcast: one message per answered (or failed) message id, for callers on any process.
ANSWERS_CHANNEL = f"{PREFIX}answers"


def lease(session_id: UUID) -> str:
    """Owner node of a session's runner; expires unless renewed."""
    return f"{PREFIX}lease:{session_id}"


def dirty(session_id: UUID) -> str:
    """Set when a message reached a session whose lease is held: the owner must look again."""
    return f"{PREFIX}dirty:{session_id}"


def node_channel(node: str) -> str:
    """Direct messages to one process: "session S has a new message"."""
    return f"{PREFIX}node:{node}"


# KEYS: lease, dirty. ARGV: node, ttl_ms, dirty_ttl_ms.
# Returns the owner after the call. Taking a free lease makes the caller the owner. A caller
# that already owns the lease marks the session dirty, so a release racing this arrival
# cannot drop the lease while the arrival proceeds as owner.
CLAIM = """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if owner == ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return owner
"""

# KEYS: lease, dirty. ARGV: node, ttl_ms, dirty_ttl_ms, channel prefix, payload.
# After a message was stored: hand it to the owner (mark dirty, publish to its channel), or
# take the free lease. Atomic with the owner's release, so no message is stranded between
# the owner's last look and its release.
NUDGE = """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
if owner ~= ARGV[1] then
  redis.call('PUBLISH', ARGV[4] .. owner, ARGV[5])
end
return owner
"""

# KEYS: lease, dirty. ARGV: node. Release the lease only if nothing arrived since the owner
# last looked; "anything new?" and the release are one step.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'lost'
end
if redis.call('DEL', KEYS[2]) == 1 then
  return 'dirty'
end
redis.call('DEL', KEYS[1])
return 'released'
"""

# KEYS: lease. ARGV: node, ttl_ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: node. Let a session go at shutdown whatever its dirty mark: the dirty
# mark stays, and whoever claims the session next answers what is unanswered.
DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
