-- Sender: campaign guard-rails (sender/guardrails.py). A sending campaign whose bounce, error or
-- complaint rate over its recipients so far crosses its threshold moves to 'paused' with
-- `pause_reason` (e.g. "complaint_rate: 3 complaints of 1000 sent (0.30 %) >= 0.30 %") and
-- `auto_paused_at`. An explicit resume clears both and stores the counters at that moment in
-- `guard_base` (sent, failed, bounced, complained): from then on the guard-rails judge only the
-- recipients since the resume, so the operator's decision is not undone by the same old figures.
-- Nullable / constant defaults: adding them rewrites nothing.
ALTER TABLE campaigns
    ADD COLUMN pause_reason text,
    ADD COLUMN auto_paused_at timestamptz,
    ADD COLUMN guard_base bigint[] NOT NULL DEFAULT '{0,0,0,0}';
