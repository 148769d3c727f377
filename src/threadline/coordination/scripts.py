"""The Lua scripts behind every atomic step on leases (``leases.py`` runs them).

A lease's value is a claim token, ``node:generation``: the node says which process owns the
session (and so where nudges go), the generation which of that process's claims it is, so a
stale reply about an older claim (a release racing a new claim) cannot undo a newer one.

Every script touches the keys of one slot only, as a Redis Cluster requires: the session
scripts (CLAIM, NUDGE, RELEASE, RENEW, DROP) a session's lease and dirty mark (one hash tag),
the index scripts (LIST, UNLIST, DUE, ORPHANS, STRANDED) one bucket of the orphan index.
``leases.py`` orders the two kinds so that a held lease is always listed.
"""

from __future__ import annotations

# The Redis clock in milliseconds (of the node that runs the script).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# CLAIM and NUDGE start alike. KEYS: lease, dirty. ARGV: token, ttl_ms, dirty_ttl_ms, node.
_HEAD = """
local lease_key, dirty_key = KEYS[1], KEYS[2]
local token, ttl_ms, dirty_ttl_ms, node = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
"""

# A free lease is taken with this claim's token (listed as active beforehand: see LIST).
_TAKE_IF_FREE = """
local owner = redis.call('GET', lease_key)
if not owner then
  redis.call('SET', lease_key, token, 'PX', ttl_ms)
  return token
end
"""

# Returns the owning token after the call. Taking a free lease makes the caller the owner. A
# node that already owns the lease marks the session dirty, so a release racing this arrival
# cannot drop the lease while the arrival proceeds as owner.
CLAIM = (
    _HEAD
    + _TAKE_IF_FREE
    + """
if string.sub(owner, 1, #node + 1) == node .. ':' then
  redis.call('SET', dirty_key, '1', 'PX', dirty_ttl_ms)
end
return owner
"""
)

# After a message was stored: hand it to the owner (mark dirty; the caller then tells the
# owner's process on its channel), or take the free lease. Atomic with the owner's release
# (both on the session's slot), so no message is stranded between the owner's last look and
# its release: a release after this sees the dirty mark, one before it left the lease free.
NUDGE = (
    _HEAD
    + _TAKE_IF_FREE
    + """
redis.call('SET', dirty_key, '1', 'PX', dirty_ttl_ms)
return owner
"""
)

# KEYS: lease, dirty. ARGV: token. Release the lease only if it is still this claim and
# nothing arrived since the owner last looked: "anything new?" and the release are one step.
RELEASE = """
local lease_key, dirty_key, token = KEYS[1], KEYS[2], ARGV[1]
if redis.call('GET', lease_key) ~= token then
  return 'lost'
end
if redis.call('DEL', dirty_key) == 1 then
  return 'dirty'
end
redis.call('DEL', lease_key)
return 'released'
"""

# KEYS: lease. ARGV: token, ttl_ms. 1 if the claim was renewed.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: token. Let a session go at shutdown whatever its dirty mark: the dirty
# mark stays, and whoever claims the session next answers what is unanswered (its index
# entry is made due by DUE, so some process's watchdog does).
DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: an active bucket. ARGV: session id, ttl_ms. List a session as leased until ttl_ms
# from now, before its lease is taken or renewed. Returns the entry's score, which only ever
# grows while the entry exists (at least the old score + 1): UNLIST removes the entry only
# with the score its lister got back, so it never removes an entry someone listed since.
LIST = (
    _NOW
    + """
local session = ARGV[1]
local score = now + tonumber(ARGV[2])
local old = tonumber(redis.call('ZSCORE', KEYS[1], session))
if old and old >= score then
  score = old + 1
end
redis.call('ZADD', KEYS[1], score, session)
return score
"""
)

# KEYS: an active bucket. ARGV: session id, the score LIST returned. After a release: unlist
# the session unless someone listed it since (about to claim it, or holding it now).
UNLIST = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: an active bucket. ARGV: session id, the score LIST returned. After DROP: make the
# entry due now, so the next watchdog pass takes the session (unless listed since).
DUE = (
    _NOW
    + """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  return redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
end
return 0
"""
)

# KEYS: an inflight bucket. ARGV: member (``session|token``), due in ms. Before storing a
# message into a session another process owns: should this process die between its insert
# and its NUDGE, a watchdog finds the entry due (STRANDED) and has the store looked at again.
INFLIGHT = (
    _NOW
    + """
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""
)

# KEYS: an inflight bucket. ARGV: member. After NUDGE: the insert is announced, unlist it.
ANNOUNCED = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# KEYS: an inflight bucket. ARGV: how many. Inserts listed by INFLIGHT whose NUDGE never came
# (the process died in between): ``session|token`` entries past due, unlisted as they are
# returned so that one watchdog handles each.
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

# KEYS: an active bucket. ARGV: how many. Sessions whose lease ran out without a release (or
# listed by a claim that then found the lease taken, or whose release was cut short: the
# watchdog's claim settles which).
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
