-- Sender: the provider retry budget (sender/delivery.py). `retry_since` is when a recipient's
-- current send round first failed with a retryable provider error (5xx, timeout, connection,
-- 429); it survives dramatiq redeliveries and worker restarts, and a recipient is marked failed
-- once it has been failing for MAILGENIUS_SEND_RETRY_BUDGET seconds. Cleared when the row is marked
-- failed, so retry-failed starts a fresh budget. Nullable, no default, not indexed: adding
-- it rewrites nothing, and updates of it stay HOT (see 0201).
ALTER TABLE messages ADD COLUMN retry_since timestamptz;
