-- Sender: why each failed recipient failed, for the failures report
-- (GET /api/campaigns/{id}/failures, sender/failures.py). One row per message that ended
-- `failed` (written by the send path's record statement, sender/sending.py RECORD_SQL, in the
-- same statement as the status): the stage of the SMTP conversation it was refused at (connect,
-- MAIL, RCPT, DATA; NULL for a failure before the provider, e.g. a template error), the relay's
-- reply code, and the failure reason (the label of mailgenius_email_send_failures_total: bounced
-- for a hard bounce, rejected, smtputf8, ...). The reply text is messages.last_error.
-- A side table (like message_failures, 0201) so that the report pages by (campaign_id,
-- message_id) without an index on `messages`; retry-failed leaves the row, the report shows a
-- message only while it is still failed.
CREATE TABLE message_refusals (
    message_id  bigint PRIMARY KEY,
    campaign_id bigint,            -- NULL: a transactional email
    reason      text NOT NULL,
    stage       text,
    smtp_code   integer,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_refusals_campaign_idx ON message_refusals (campaign_id, message_id);

-- recipients that failed before this migration: reason unknown, time of their last update
INSERT INTO message_refusals (message_id, campaign_id, reason, failed_at)
SELECT m.id, m.campaign_id, 'unknown', m.updated_at
FROM message_failures f JOIN messages m ON m.id = f.message_id AND m.status = 'failed';
