-- Sender: message_provider_ids (0201) looked up by a hash index instead of a unique btree.
--
-- The send path inserts one row per sent email, keyed by the provider's id (random UUIDs at
-- Resend): a unique btree with ON CONFLICT cost ~9 us of Postgres CPU per email (random leaf
-- pages, speculative insertion), a hash index ~2 us. Webhooks only ever look ids up by equality.
-- Uniqueness is not needed: a message is recorded sent once (only rows still 'sending' are
-- updated, in the same statement as this insert), and the lookup takes any one match.
ALTER TABLE message_provider_ids DROP CONSTRAINT message_provider_ids_pkey;
CREATE INDEX message_provider_ids_hash ON message_provider_ids USING hash (provider_message_id);
