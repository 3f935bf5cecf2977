-- Sender: let the send path's two per-row updates of `messages` (claim pending -> sending,
-- record sending -> sent | failed) be HOT updates (no new index entries, no index bloat).
--
-- An update is HOT only when no column it changes appears in any index (key, INCLUDE or
-- partial-index predicate) and the new row version fits on the same page. Before this migration
-- `status` sat in messages_failed_idx (predicate) and messages_transactional_status_idx (key),
-- and `provider_message_id` was itself indexed, so every claim and every record wrote a new entry
-- into every index of the table (pkey, campaign+lead, campaign+batch, ...).
--
-- Those three lookups move to two small side tables, written set-based by the same statement
-- that updates `messages` (sender/sending.py RECORD_SQL), so they stay exact:
--   * message_provider_ids: webhook lookup by the provider's id (sender/events.py);
--   * message_failures: the failed recipients, for retry-failed (campaign or transactional).
-- Invariant: a message has a message_failures row exactly while its status is 'failed'.
-- No foreign keys on purpose: a row-by-row RI check (and its FOR KEY SHARE lock on the message
-- row) per insert is what the send path cannot afford; readers join `messages`, so a row left by
-- a deleted message is ignored.

DROP INDEX messages_failed_idx;
DROP INDEX messages_transactional_status_idx;
DROP INDEX messages_provider_id_idx;

CREATE TABLE message_provider_ids (
    provider_message_id text PRIMARY KEY,
    message_id          bigint NOT NULL
);

CREATE TABLE message_failures (
    message_id  bigint PRIMARY KEY,
    campaign_id bigint            -- NULL: a transactional email
);
CREATE INDEX message_failures_campaign_idx ON message_failures (campaign_id, message_id);

INSERT INTO message_provider_ids (provider_message_id, message_id)
SELECT provider_message_id, min(id) FROM messages
WHERE provider_message_id IS NOT NULL AND provider_message_id <> ''
GROUP BY provider_message_id;

INSERT INTO message_failures (message_id, campaign_id)
SELECT id, campaign_id FROM messages WHERE status = 'failed';

-- Room on every ledger page for the row versions the send path writes. A HOT update needs the
-- new version on the same page; the claim adds a second version of every row (the first is still
-- live until it commits), and the record then needs room for the claimed and the sent versions
-- (the pending ones are pruned by then): about 124 + 156 bytes per row with line pointers, i.e.
-- at most ~29 rows of a page; fillfactor 40 leaves ~26 rows per page, with slack for longer
-- addresses. Costs disk (the table is ~2x larger) and ~5 % of the ledger insert (2,000,000 rows:
-- 8.2 -> 8.5 s); saves two index-maintaining updates per email. Applies to pages written from now on.
ALTER TABLE messages SET (fillfactor = 40);
