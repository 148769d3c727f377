-- Idempotency keys: a client (a channel passing its provider's message id) may send a message
-- with a key; within a session, a key names one message forever (kept as long as the message).
-- fingerprint: a hash of what defines the message (coordination/base.py), so that the same key
-- sent with another body is refused instead of answered with the first one's reply.
ALTER TABLE messages ADD COLUMN idempotency_key text;
ALTER TABLE messages ADD COLUMN fingerprint text;
-- The constraint that decides a race between two processes storing one key. Partial: messages
-- without a key (most of them, replies and tool rows included) stay out of the index. Built in
-- the migration's transaction (not CONCURRENTLY): on a column just added, every row is NULL and
-- the build is one scan of messages, during which writes to it wait.
CREATE UNIQUE INDEX messages_idempotency_key ON messages (session_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
