"""The Lua scripts behind every atomic step on leases (``leases.py`` runs them).

A lease's value is a claim token, ``node:generation``: the node says which process owns the
session (and so where nudges go), the generation which of that process's claims it is, so a
stale reply about an older claim (a release racing a new claim) cannot undo a newer one.
"""

from __future__ import annotations

# The Redis clock in milliseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# CLAIM and NUDGE start alike. KEYS: lease, dirty, active, inflight. ARGV: token, ttl_ms,
# dirty_ttl_ms, session id, node.
_HEAD = (
    _NOW
    + """
local lease_key, dirty_key, active_key, inflight_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, ttl_ms, dirty_ttl_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local session, node = ARGV[4], ARGV[5]
"""
)

# A free lease is taken with this claim's token, and listed as active.
_TAKE_IF_FREE = """
local owner = redis.call('GET', lease_key)
if not owner then
  redis.call('SET', lease_key, token, 'PX', ttl_ms)
  redis.call('ZADD', active_key, now + ttl_ms, session)
  return token
end
"""

# ARGV[6]: inflight_ms, 0 unless the caller is about to store a message.
# Returns the owning token after the call. Taking a free lease makes the caller the owner. A
# node that already owns the lease marks the session dirty, so a release racing this arrival
# cannot drop the lease while the arrival proceeds as owner. A caller about to store a message
# into a session another node owns lists ``session|token`` in the inflight set, due in
# inflight_ms: should it die between its insert and its NUDGE (which unlists it), a watchdog
# finds the entry due and has the session's store looked at again.
CLAIM = (
    _HEAD
    + _TAKE_IF_FREE
    + """
if string.sub(owner, 1, #node + 1) == node .. ':' then
  redis.call('SET', dirty_key, '1', 'PX', dirty_ttl_ms)
elseif tonumber(ARGV[6]) > 0 then
  redis.call('ZADD', inflight_key, now + tonumber(ARGV[6]), session .. '|' .. token)
end
return owner
"""
)

# ARGV as CLAIM's up to node, then the publishing command (PUBLISH, SPUBLISH, or "" for none),
# the owner's channel prefix and suffix, the payload; ``token`` is the one the CLAIM that
# listed this insert used. Returns the owning token after the call.
# After a message was stored: unlist the insert, then hand the message to the owner (mark
# dirty, publish to its node's channel), or take the free lease. The dirty mark is atomic
# with the owner's release, so no message is stranded between the owner's last look and its
# release. With no publishing command (Redis Cluster: the owner's channel is in another slot
# than the session's keys, which one script cannot touch) the caller publishes once the
# script returned (``Leases.nudge``).
NUDGE = (
    _HEAD
    + """
redis.call('ZREM', inflight_key, session .. '|' .. token)
"""
    + _TAKE_IF_FREE
    + """
local publish, channel_prefix, channel_suffix, payload = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
redis.call('SET', dirty_key, '1', 'PX', dirty_ttl_ms)
local owner_node = string.match(owner, '^([^:]+):')
if owner_node ~= node and publish ~= '' then
  redis.call(publish, channel_prefix .. owner_node .. channel_suffix, payload)
end
return owner
"""
)

# KEYS: lease, dirty, active. ARGV: token, session id. Release the lease only if it is still
# this claim and nothing arrived since the owner last looked: "anything new?" and the release
# are one step.
RELEASE = """
local lease_key, dirty_key, active_key = KEYS[1], KEYS[2], KEYS[3]
local token, session = ARGV[1], ARGV[2]
if redis.call('GET', lease_key) ~= token then
  return 'lost'
end
if redis.call('DEL', dirty_key) == 1 then
  return 'dirty'
end
redis.call('DEL', lease_key)
redis.call('ZREM', active_key, session)
return 'released'
"""

# KEYS: lease, active. ARGV: token, ttl_ms, session id. 1 if the claim was renewed.
RENEW = (
    _NOW
    + """
local lease_key, active_key = KEYS[1], KEYS[2]
local token, ttl_ms, session = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('GET', lease_key) == token then
  redis.call('ZADD', active_key, now + ttl_ms, session)
  return redis.call('PEXPIRE', lease_key, ttl_ms)
end
return 0
"""
)

# KEYS: lease, active. ARGV: token, session id. Let a session go at shutdown whatever its
# dirty mark: the dirty mark stays, and whoever claims the session next answers what is
# unanswered. It stays listed as active (expired now), so some process's watchdog does.
DROP = (
    _NOW
    + """
local lease_key, active_key = KEYS[1], KEYS[2]
local token, session = ARGV[1], ARGV[2]
if redis.call('GET', lease_key) == token then
  redis.call('ZADD', active_key, now, session)
  return redis.call('DEL', lease_key)
end
return 0
"""
)

# KEYS: inflight. ARGV: how many. Inserts listed by CLAIM whose NUDGE never came (the process
# died in between): ``session|token`` entries past due, unlisted as they are returned so that
# one watchdog handles each.
STRANDED = (
    _NOW
    + """
local inflight_key, limit = KEYS[1], tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', inflight_key, '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  redis.call('ZREM', inflight_key, unpack(due))
end
return due
"""
)

# KEYS: active. ARGV: how many. Sessions whose lease ran out without a release.
ORPHANS = (
    _NOW
    + """
local active_key, limit = KEYS[1], tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', active_key, '-inf', now, 'LIMIT', 0, limit)
"""
)

# Append a run event to its session's log and publish it with its id, in one step so that a
# watcher that replays the log and then follows the channel sees every event once, in order.
# KEYS[1] the session's log; ARGV: [1] log length kept (approximately), [2] the event JSON,
# [3] how long the log outlives its last event (ms), [4] the session's channel (in the log's
# slot: same hash tag), [5] the publishing command (PUBLISH, or SPUBLISH when sharded).
PUBLISH_EVENT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call(ARGV[5], ARGV[4], id .. ' ' .. ARGV[2])
return id
"""
