-- See postgres/004.
ALTER TABLE messages ADD COLUMN idempotency_key TEXT;
ALTER TABLE messages ADD COLUMN fingerprint TEXT;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (session_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
