"""The SQL statements of ``PostgresStore``, kept apart from the code that runs them.

Constants only. The snapshot guard and its slow path are described in ``postgres.py``.

Lock order. Every statement that writes a session's runs locks the session row first (the runs
write depends on the session UPDATE's output), so two statements never wait on each other's
locks in opposite orders.
"""

from __future__ import annotations

MSG = (
    "id, session_id, seq, role, content, run_id, payload, channel_payload, created_at, options,"
    " idempotency_key, fingerprint"
)
SESSION = "id, name, agent, user_id, metadata, created_at, updated_at"
RUN = (
    "id, session_id, agent, status, message_ids, upto_seq, reply_message_id, superseded_by,"
    " error, model, usage, created_at, started_at, finished_at, error_code"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages"
    " (id, session_id, seq, role, content, run_id, payload, channel_payload, options)"
)
# A user message may carry an idempotency key. No ON CONFLICT: a key the session holds makes
# the whole statement fail on the unique index (messages_idempotency_key), so that nothing of
# it lands (last_seq, the run it would open); ``PostgresStore`` then reads the stored message.
_INSERT_USER_MESSAGE = (
    "INSERT INTO messages (id, session_id, seq, role, content, run_id, payload, channel_payload,"
    " options, idempotency_key, fingerprint)"
)
# The unique index whose violation means "this key is stored already".
KEY_INDEX = "messages_idempotency_key"
DELIVERY = (
    "id, run_id, session_id, url, body, status, attempts, next_attempt_at, last_error,"
    " last_status_code, created_at, retry_from, delivered_at, lease_owner, lease_expires_at"
)
# The outbox rows a run's ending owes, written only when `source` (the CTE that ended the run)
# returned the run: a fenced-out commit or an already-finished run writes none.
_INSERT_DELIVERIES = """
    INSERT INTO deliveries (id, run_id, session_id, url, body)
    SELECT e.id, $2::uuid, $1::uuid, e.url, e.body
    FROM {source}, unnest({params}) AS e (id, url, body)"""
# Every row of a run-opening statement carries the run's columns, prefixed with r_.
_TAGGED = (
    ", ".join(f"x.{c}" for c in MSG.split(", "))
    + ", "
    + ", ".join(f"r.{c} AS r_{c}" for c in RUN.split(", "))
)

# Parameters shared by both run-opening statements: $1 session, $2 run id, $3 agent, $4 model,
# $5 history_limit, $6 upto_seq. `snap` reads the counters the guard compares; `earlier` the
# snapshot's unanswered user messages up to upto_seq. `r` opens the run over `prompt`; `history`
# is the newest history_limit rows that are not unanswered user messages (those are this prompt
# or a later one), re-sorted by the final ORDER BY.
#
# The guard also compares current_run_id, which start_run and finish_run change without moving
# a counter: when it holds, snap.current_run_id is the run being fenced out and its row is in
# the snapshot, so `stale` can close it. `stale` reads `r`, so it runs only once the run is open
# and after the session UPDATE took the session row lock. A run already finished (its runner
# called finish_run) keeps its own status.
_EARLIER = f"""
earlier AS (
    SELECT {MSG} FROM messages
    WHERE session_id = $1::uuid AND role = 'user'
      AND seq > (SELECT answered_seq FROM snap) AND seq <= (SELECT upto FROM snap)
)"""
_GUARD = """
      AND sessions.last_seq = snap.last_seq AND sessions.answered_seq = snap.answered_seq
      AND sessions.current_run_id IS NOT DISTINCT FROM snap.current_run_id"""
_OPEN_RUN = f"""
r AS (
    INSERT INTO runs (id, session_id, agent, status, message_ids, upto_seq, model, started_at)
    SELECT $2::uuid, $1::uuid, $3::text, 'running', array_agg(p.id ORDER BY p.seq), max(p.seq),
           $4::text, now()
    FROM prompt p HAVING count(*) > 0
    RETURNING {RUN}
),
stale AS (
    UPDATE runs SET status = 'superseded', superseded_by = r.id, finished_at = now()
    FROM snap, r
    WHERE runs.id = snap.current_run_id AND runs.session_id = $1::uuid
      AND runs.status IN ('queued', 'running')
),
history AS (
    SELECT * FROM (
        SELECT {MSG} FROM messages
        WHERE session_id = $1::uuid AND EXISTS (SELECT 1 FROM r)
          AND NOT (role = 'user' AND seq > (SELECT answered_seq FROM snap))
        ORDER BY seq DESC LIMIT $5::bigint
    ) newest
)"""

# Hot path, round-trip 1. Extra parameters: $7.. $15 the message. The new row is invisible to
# the statement's own snapshot, so `prompt` unions it in from the INSERT's RETURNING.
ADD_MESSAGE_AND_START = f"""
WITH snap AS (
    SELECT last_seq, answered_seq, current_run_id, COALESCE($6::bigint, last_seq + 1) AS upto
    FROM sessions WHERE id = $1::uuid
),{_EARLIER},
s AS (
    UPDATE sessions
    SET last_seq = sessions.last_seq + 1, updated_at = now(),
        current_run_id = CASE WHEN snap.upto > snap.last_seq OR EXISTS (SELECT 1 FROM earlier)
                         THEN $2::uuid ELSE sessions.current_run_id END
    FROM snap
    WHERE sessions.id = $1::uuid{_GUARD}
    RETURNING sessions.last_seq AS seq, snap.upto
),
m AS (
    {_INSERT_USER_MESSAGE}
    SELECT $7::uuid, $1::uuid, s.seq, $8::text, $9::text, $10::uuid, $11::bytea, $12::jsonb,
           $13::jsonb, $14::text, $15::text
    FROM s
    RETURNING {MSG}
),
prompt AS (
    SELECT * FROM earlier WHERE EXISTS (SELECT 1 FROM s)
    UNION ALL
    SELECT m.* FROM m, s WHERE m.seq <= s.upto
),{_OPEN_RUN}
SELECT x.kind, {_TAGGED}
FROM (
    SELECT 'message' AS kind, m.* FROM m
    UNION ALL SELECT 'prompt', prompt.* FROM prompt
    UNION ALL SELECT 'history', history.* FROM history
) x LEFT JOIN r ON true
ORDER BY x.seq
"""

# Returns the snapshot's prompt rows even when the guard fails, so that "prompt rows but no
# run" tells a lost race (rerun under lock) from "nothing to answer" (no rows).
START_RUN = f"""
WITH snap AS (
    SELECT last_seq, answered_seq, current_run_id, $6::bigint AS upto
    FROM sessions WHERE id = $1::uuid
),{_EARLIER},
s AS (
    UPDATE sessions SET current_run_id = $2::uuid
    FROM snap
    WHERE sessions.id = $1::uuid{_GUARD}
      AND EXISTS (SELECT 1 FROM earlier)
    RETURNING sessions.id
),
prompt AS (SELECT * FROM earlier WHERE EXISTS (SELECT 1 FROM s)),{_OPEN_RUN}
SELECT x.kind, {_TAGGED}
FROM (
    SELECT 'prompt' AS kind, earlier.* FROM earlier
    UNION ALL SELECT 'history', history.* FROM history
) x LEFT JOIN r ON true
ORDER BY x.seq
"""

# Hot path, round-trip 2. The fence is the session UPDATE's WHERE: the row lock makes it see
# the latest current_run_id, and every other part only runs on the row it returns.
COMMIT_RUN = f"""
WITH s AS (
    UPDATE sessions
    SET last_seq = last_seq + 1, updated_at = now(), current_run_id = NULL,
        answered_seq = GREATEST(answered_seq, (SELECT upto_seq FROM runs WHERE id = $2::uuid))
    WHERE id = $1::uuid AND current_run_id = $2::uuid
    RETURNING last_seq
),
m AS (
    {_INSERT_MESSAGE}
    SELECT $3::uuid, $1::uuid, s.last_seq, $4::text, $5::text, $2::uuid, $6::bytea, $7::jsonb,
           NULL
    FROM s
    RETURNING {MSG}
),
r AS (
    UPDATE runs
    SET status = 'succeeded', reply_message_id = m.id, usage = $8::jsonb, finished_at = now()
    FROM m WHERE runs.id = $2::uuid
    RETURNING runs.id
),
d AS ({_INSERT_DELIVERIES.format(params="$9::uuid[], $10::text[], $11::text[]", source="r")}
)
SELECT {MSG} FROM m
"""

# Only an unfinished run can be finished; its side effects take the next seqs. The runs UPDATE
# reads `s` so that it locks the session row before the run's (see "Lock order" above), and
# rechecks the status so that a run closed as stale meanwhile keeps that status (and then owes
# no delivery: `d` reads its RETURNING). A failed run
# that still holds the fence answers its messages by failure: answered_seq moves past them
# ($12, ``closes_messages``: also a run a client cancelled).
FINISH_RUN = f"""
WITH target AS (
    SELECT id, upto_seq FROM runs
    WHERE id = $2::uuid AND session_id = $1::uuid AND status IN ('queued', 'running')
),
s AS (
    UPDATE sessions
    SET last_seq = last_seq + cardinality($6::uuid[]), updated_at = now(),
        answered_seq = CASE WHEN $12::bool AND current_run_id = $2::uuid
                            THEN GREATEST(answered_seq, (SELECT upto_seq FROM target))
                            ELSE answered_seq END,
        current_run_id = CASE WHEN current_run_id = $2::uuid THEN NULL ELSE current_run_id END
    WHERE id = $1::uuid AND EXISTS (SELECT 1 FROM target)
    RETURNING last_seq - cardinality($6::uuid[]) AS base
),
m AS (
    {_INSERT_MESSAGE}
    SELECT e.id, $1::uuid, s.base + e.ord, e.role, e.content, $2::uuid, e.payload, e.channel::jsonb,
           NULL
    FROM s, unnest($6::uuid[], $7::text[], $8::text[], $9::bytea[], $10::text[])
         WITH ORDINALITY AS e (id, role, content, payload, channel, ord)
),
f AS (
    UPDATE runs SET status = $3::text, error = $4::text, error_code = $11::text,
                    superseded_by = $5::uuid, finished_at = now()
    FROM s
    WHERE runs.id IN (SELECT id FROM target) AND runs.status IN ('queued', 'running')
    RETURNING {", ".join(f"runs.{c}" for c in RUN.split(", "))}
),
d AS ({_INSERT_DELIVERIES.format(params="$13::uuid[], $14::text[], $15::text[]", source="f")}
    WHERE $12::bool
)
SELECT {RUN} FROM f
"""

ADD_MESSAGE = f"""
WITH s AS (
    UPDATE sessions SET last_seq = last_seq + 1, updated_at = now()
    WHERE id = $1::uuid RETURNING last_seq
)
{_INSERT_USER_MESSAGE}
SELECT $2::uuid, $1::uuid, s.last_seq, $3::text, $4::text, $5::uuid, $6::bytea, $7::jsonb,
       $8::jsonb, $9::text, $10::text
FROM s
RETURNING {MSG}
"""

FIND_MESSAGE = f"SELECT {MSG} FROM messages WHERE session_id = $1 AND idempotency_key = $2"

# The run answering a message: succeeded with its reply, or failed (no reply). Served by the
# GIN index on runs.message_ids (migration 002); at most one run answers a message, as the
# fence and answered_seq make sure.
ANSWER_FOR = f"""
SELECT {", ".join(f"m.{c}" for c in MSG.split(", "))},
       {", ".join(f"r.{c} AS r_{c}" for c in RUN.split(", "))}
FROM runs r LEFT JOIN messages m ON m.id = r.reply_message_id
WHERE r.message_ids @> ARRAY[$1::uuid]
  AND (r.status IN ('succeeded', 'failed')
       OR (r.status = 'cancelled' AND r.error_code = 'run_cancelled'))
LIMIT 1
"""

CREATE_SESSION = f"""
INSERT INTO sessions (id, name, agent, user_id, metadata) VALUES ($1, $2, $3, $4, $5)
RETURNING {SESSION}
"""
# Exactly one branch returns a row: the insert's (invisible to the second branch's snapshot)
# or the existing one's. Neither, if the winner committed after our snapshot: the caller reruns.
GET_OR_CREATE_SESSION = f"""
WITH ins AS (
    INSERT INTO sessions (id, name, agent, user_id, metadata)
    VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::jsonb)
    ON CONFLICT DO NOTHING
    RETURNING {SESSION}
)
SELECT * FROM ins
UNION ALL
SELECT {SESSION} FROM sessions
WHERE COALESCE(user_id, '') = COALESCE($4::text, '') AND name = $2::text
"""
GET_SESSION = f"SELECT {SESSION} FROM sessions WHERE id = $1"
FIND_SESSION = f"""
SELECT {SESSION} FROM sessions
WHERE COALESCE(user_id, '') = COALESCE($2::text, '') AND name = $1::text
"""
DELETE_SESSION = "DELETE FROM sessions WHERE id = $1 RETURNING id"
# One row at least, carrying the total, even when the page is past the end.
_LIST_SESSIONS_TEMPLATE = f"""
WITH page AS (
    SELECT {SESSION} FROM sessions {{where}}
    ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM sessions {{where}}) t LEFT JOIN page ON true
ORDER BY page.created_at DESC, page.id DESC
"""
# No user means the anonymous namespace, as in FIND_SESSION (and its index's expression).
LIST_SESSIONS = _LIST_SESSIONS_TEMPLATE.format(where="WHERE COALESCE(user_id, '') = ''")
LIST_USER_SESSIONS = _LIST_SESSIONS_TEMPLATE.format(where="WHERE user_id = $3")
LIST_MESSAGES = f"""
WITH page AS (
    SELECT {MSG} FROM messages WHERE session_id = $1 ORDER BY seq LIMIT $2 OFFSET $3
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM messages WHERE session_id = $1) t LEFT JOIN page ON true
ORDER BY page.seq
"""
UNANSWERED = f"""
SELECT {", ".join(f"m.{c}" for c in MSG.split(", "))}
FROM messages m JOIN sessions s ON s.id = m.session_id
WHERE m.session_id = $1 AND m.role = 'user' AND m.seq > s.answered_seq
ORDER BY m.seq
"""
GET_RUN = f"SELECT {RUN} FROM runs WHERE id = $1"
ACTIVE_RUN = f"""
SELECT {", ".join(f"r.{c}" for c in RUN.split(", "))}
FROM sessions s JOIN runs r ON r.id = s.current_run_id
WHERE s.id = $1 AND r.status IN ('queued', 'running')
"""
# The slow path's first statement, in the same transaction as the rerun.
LOCK_SESSION = "SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE"

GET_MESSAGE = f"SELECT {MSG} FROM messages WHERE id = $1"
# last_seq > answered_seq first: a session whose every row is answered costs no probe.
SESSIONS_WITH_UNANSWERED = """
SELECT s.id FROM sessions s
WHERE s.last_seq > s.answered_seq
  AND EXISTS (SELECT 1 FROM messages m
              WHERE m.session_id = s.id AND m.role = 'user' AND m.seq > s.answered_seq)
LIMIT $1
"""
LIST_RUNS = f"""
WITH page AS (
    SELECT {RUN} FROM runs WHERE session_id = $1
    ORDER BY created_at, started_at, id LIMIT $2 OFFSET $3
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM runs WHERE session_id = $1) t LEFT JOIN page ON true
ORDER BY page.created_at, page.started_at, page.id
"""

# -- the webhook outbox ----------------------------------------------------------------------

# SKIP LOCKED: concurrent senders (other processes) each take different rows instead of
# queueing behind one another's locks. A row leased to a sender that stopped renewing (killed
# mid-send) is due again once its lease expires. The attempt is counted here, so a send that
# killed its process still counts.
CLAIM_DELIVERIES = f"""
UPDATE deliveries
SET status = 'delivering', attempts = attempts + 1, lease_owner = $1::text,
    lease_expires_at = now() + make_interval(secs => $3::float8)
WHERE id IN (
    SELECT id FROM deliveries
    WHERE (status = 'pending' AND next_attempt_at <= now())
       OR (status = 'delivering' AND lease_expires_at < now())
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING {DELIVERY}
"""
# Only the lease holder settles: a sender whose lease expired (and was claimed again) must not
# overwrite what the new holder records. The last error stays visible after a success.
SETTLE_DELIVERY = """
UPDATE deliveries
SET status = CASE
        WHEN $3::bool THEN 'delivered'
        WHEN now() + make_interval(secs => $6::float8)
             > retry_from + make_interval(secs => $7::float8) THEN 'failed'
        ELSE 'pending' END,
    delivered_at = CASE WHEN $3::bool THEN now() END,
    next_attempt_at = CASE WHEN $3::bool THEN next_attempt_at
                           ELSE now() + make_interval(secs => $6::float8) END,
    last_status_code = $4::integer,
    last_error = CASE WHEN $3::bool THEN last_error ELSE $5::text END,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1::uuid AND lease_owner = $2::text AND status = 'delivering'
RETURNING id
"""
GET_DELIVERY = f"SELECT {DELIVERY} FROM deliveries WHERE id = $1"
REDELIVER = f"""
UPDATE deliveries
SET status = 'pending', next_attempt_at = now(), retry_from = now(), delivered_at = NULL,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1::uuid
RETURNING {DELIVERY}
"""
_LIST_DELIVERIES_TEMPLATE = f"""
WITH page AS (
    SELECT {DELIVERY} FROM deliveries {{where}}
    ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2
)
SELECT t.total, page.*
FROM (SELECT count(*) AS total FROM deliveries {{where}}) t LEFT JOIN page ON true
ORDER BY page.created_at DESC, page.id DESC
"""
# $3 status, $4 owner: NULL means any. Two fixed texts would need four variants; the planner
# folds the NULL tests of a prepared statement's parameters at execution.
LIST_DELIVERIES = _LIST_DELIVERIES_TEMPLATE.format(
    where="WHERE ($3::text IS NULL OR status = $3::text) AND ($4::text IS NULL OR session_id IN "
    "(SELECT id FROM sessions WHERE user_id = $4::text))"
)

# Only into a session that has no message yet: the UPDATE's WHERE decides, under the row lock.
SEED_HISTORY = f"""
WITH s AS (
    UPDATE sessions
    SET last_seq = cardinality($2::uuid[]), answered_seq = cardinality($2::uuid[]),
        updated_at = now()
    WHERE id = $1::uuid AND last_seq = 0
    RETURNING id
)
{_INSERT_MESSAGE}
SELECT e.id, s.id, e.ord, e.role, e.content, NULL, NULL, NULL, NULL
FROM s, unnest($2::uuid[], $3::text[], $4::text[]) WITH ORDINALITY AS e (id, role, content, ord)
RETURNING seq
"""
