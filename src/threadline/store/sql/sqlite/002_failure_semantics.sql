-- See postgres/003. SQLite cannot alter a CHECK constraint: the runs table is rebuilt.
CREATE TABLE runs_new (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    agent TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'superseded', 'cancelled')),
    message_ids TEXT NOT NULL,
    upto_seq INTEGER NOT NULL,
    reply_message_id TEXT,
    superseded_by TEXT,
    error TEXT,
    model TEXT,
    usage TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error_code TEXT
);
INSERT INTO runs_new
    SELECT id, session_id, agent, status, message_ids, upto_seq, reply_message_id, superseded_by,
           error, model, usage, created_at, started_at, finished_at, NULL
    FROM runs;
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
CREATE INDEX runs_session_id ON runs (session_id);
ALTER TABLE messages ADD COLUMN options TEXT;
