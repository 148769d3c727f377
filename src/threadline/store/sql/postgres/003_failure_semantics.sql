-- Every run ends in one of succeeded | failed | superseded | cancelled (a shutdown). A failed
-- run answers its messages by failure: error_code is the stable code its callers got.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'superseded', 'cancelled'));
ALTER TABLE runs ADD COLUMN error_code text;
-- What the caller asked of the run answering this message (agent, user_id, history_limit,
-- context), so any process that takes the session over runs it the same way.
ALTER TABLE messages ADD COLUMN options jsonb;
