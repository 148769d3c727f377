-- Sessions carry the per-session counters that serialise writers: every insert into messages
-- bumps last_seq in the same statement, so the session row lock orders them.
CREATE TABLE sessions (
    id uuid PRIMARY KEY,
    name text,
    agent text NOT NULL,
    user_id text,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_seq bigint NOT NULL DEFAULT 0,
    answered_seq bigint NOT NULL DEFAULT 0,
    current_run_id uuid
);

-- COALESCE so that sessions without a user share one namespace (NULLs never collide).
CREATE UNIQUE INDEX sessions_user_name ON sessions (COALESCE(user_id, ''), name)
    WHERE name IS NOT NULL;
CREATE INDEX sessions_created ON sessions (created_at DESC, id DESC);
CREATE INDEX sessions_user_created ON sessions (user_id, created_at DESC, id DESC);

CREATE TABLE messages (
    id uuid PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    role text NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content text NOT NULL,
    run_id uuid,
    payload bytea,
    channel_payload jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_id, seq)
);

CREATE TABLE runs (
    id uuid PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    agent text NOT NULL,
    status text NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'superseded')),
    message_ids uuid[] NOT NULL,
    upto_seq bigint NOT NULL,
    reply_message_id uuid,
    superseded_by uuid,
    error text,
    model text,
    usage jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);

CREATE INDEX runs_session_id ON runs (session_id);
