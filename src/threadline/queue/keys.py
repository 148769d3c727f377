"""Every Redis key and channel threadline uses, under one prefix, and the Lua for atomic steps.

No command ever scans keys: everything is addressed by session id or node id.
"""

from __future__ import annotations

from uuid import UUID

PREFIX = "threadline:"

# Broadcast: one message per answered (or failed) message id, for callers on any process.
ANSWERS_CHANNEL = f"{PREFIX}answers"

# Sorted set of leased sessions, scored by when their lease runs out (ms, Redis clock). A
# session whose score has passed while still listed lost its owner without a release (the
# process died): the watchdog of any process finds it here, without scanning keys.
ACTIVE = f"{PREFIX}active"

# Lua helper: the Redis clock in milliseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


def lease(session_id: UUID) -> str:
    """Owner node of a session's runner; expires unless renewed."""
    return f"{PREFIX}lease:{session_id}"


def dirty(session_id: UUID) -> str:
    """Set when a message reached a session whose lease is held: the owner must look again."""
    return f"{PREFIX}dirty:{session_id}"


def node_channel(node: str) -> str:
    """Direct messages to one process: "session S has a new message"."""
    return f"{PREFIX}node:{node}"


# KEYS: lease, dirty, active. ARGV: node, ttl_ms, dirty_ttl_ms, session id.
# Returns the owner after the call. Taking a free lease makes the caller the owner. A caller
# that already owns the lease marks the session dirty, so a release racing this arrival
# cannot drop the lease while the arrival proceeds as owner.
CLAIM = (
    _NOW
    + """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[4])
  return ARGV[1]
end
if owner == ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return owner
"""
)

# KEYS: lease, dirty, active. ARGV: node, ttl_ms, dirty_ttl_ms, channel prefix, payload,
# session id.
# After a message was stored: hand it to the owner (mark dirty, publish to its channel), or
# take the free lease. Atomic with the owner's release, so no message is stranded between
# the owner's last look and its release.
NUDGE = (
    _NOW
    + """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[6])
  return ARGV[1]
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
if owner ~= ARGV[1] then
  redis.call('PUBLISH', ARGV[4] .. owner, ARGV[5])
end
return owner
"""
)

# KEYS: lease, dirty, active. ARGV: node, session id. Release the lease only if nothing
# arrived since the owner last looked; "anything new?" and the release are one step.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'lost'
end
if redis.call('DEL', KEYS[2]) == 1 then
  return 'dirty'
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[2])
return 'released'
"""

# KEYS: lease, active. ARGV: node, ttl_ms, session id.
RENEW = (
    _NOW
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

# KEYS: lease, active. ARGV: node, session id. Let a session go at shutdown whatever its
# dirty mark: the dirty mark stays, and whoever claims the session next answers what is
# unanswered. It stays listed as active (expired), so some process's watchdog does.
DROP = (
    _NOW
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)

# KEYS: active. ARGV: how many. Sessions whose lease ran out without a release.
ORPHANS = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)
