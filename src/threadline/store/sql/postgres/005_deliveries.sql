-- The webhook outbox. A row is written by the statement that commits or fails a run (so a
-- reply and its delivery commit together) and sent by whichever process claims it first: a
-- claim takes a lease (lease_owner, lease_expires_at) that a killed sender leaves to expire,
-- after which another process claims the row again. Deliberately no foreign keys: a delivery
-- owed for a run is still owed after its session is deleted.
CREATE TABLE deliveries (
    id uuid PRIMARY KEY,
    run_id uuid NOT NULL,
    session_id uuid NOT NULL,
    url text NOT NULL,
    -- The exact JSON text that is signed and sent; text, not jsonb, so its bytes never change.
    body text NOT NULL,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivering', 'delivered', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    last_status_code integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Retries stop MAX_AGE after this (created_at, or the last redelivery request).
    retry_from timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    lease_owner text,
    lease_expires_at timestamptz
);

-- The senders' claim query: rows due, or leased to a sender that stopped renewing. Partial,
-- so delivered and failed rows (the bulk, over time) cost the index nothing.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX deliveries_status_created ON deliveries (status, created_at DESC, id DESC);
CREATE INDEX deliveries_created ON deliveries (created_at DESC, id DESC);
