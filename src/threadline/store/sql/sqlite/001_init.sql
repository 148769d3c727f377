-- Timestamps are ISO-8601 text in UTC with a fixed width (microseconds, +00:00), written by the
-- store, so that text order is time order. JSON columns are TEXT; message_ids is a JSON array.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    name TEXT,
    agent TEXT NOT NULL,
    user_id TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    answered_seq INTEGER NOT NULL DEFAULT 0,
    current_run_id TEXT
);

-- COALESCE so that sessions without a user share one namespace (NULLs never collide).
CREATE UNIQUE INDEX sessions_user_name ON sessions (COALESCE(user_id, ''), name)
    WHERE name IS NOT NULL;
CREATE INDEX sessions_created ON sessions (created_at DESC, id DESC);
CREATE INDEX sessions_user_created ON sessions (user_id, created_at DESC, id DESC);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content TEXT NOT NULL,
    run_id TEXT,
    payload BLOB,
    channel_payload TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (session_id, seq)
);

CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    agent TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'superseded')),
    message_ids TEXT NOT NULL,
    upto_seq INTEGER NOT NULL,
    reply_message_id TEXT,
    superseded_by TEXT,
    error TEXT,
    model TEXT,
    usage TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);

CREATE INDEX runs_session_id ON runs (session_id);
