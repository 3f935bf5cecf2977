-- Sender: content of transactional emails (POST /api/emails) and the indexes the send path needs.

CREATE TABLE transactional_emails (
    message_id   bigint PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    from_email   text NOT NULL,
    subject      text NOT NULL,
    html         text NOT NULL DEFAULT '',
    text         text NOT NULL DEFAULT '',
    -- sha256 of the request body: a reused Idempotency-Key with another body is a 409
    request_hash text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- retry-failed and the health check find transactional messages without scanning campaigns'
CREATE INDEX messages_transactional_status_idx ON messages (status) WHERE campaign_id IS NULL;
