-- Initial schema. Sizes in mind: 2,000,000+ leads, 10,000,000+ messages.

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    prefix      text NOT NULL UNIQUE,           -- first chars of the key, shown in listings
    key_hash    text NOT NULL UNIQUE,           -- sha256 of the whole key; the key itself is never stored
    name        text NOT NULL DEFAULT '',
    scopes      text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at  timestamptz
);

CREATE TABLE settings (
    key         text PRIMARY KEY,
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE imports (
    id              bigserial PRIMARY KEY,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    filename        text NOT NULL,
    path            text,
    bytes           bigint NOT NULL DEFAULT 0,
    sha256          text,
    mode            text NOT NULL DEFAULT 'skip' CHECK (mode IN ('skip', 'update')),
    tags            text[] NOT NULL DEFAULT '{}',
    source          text,
    encoding        text,
    delimiter       text,
    total_rows      bigint,
    processed_rows  bigint NOT NULL DEFAULT 0,
    inserted        bigint NOT NULL DEFAULT 0,
    updated         bigint NOT NULL DEFAULT 0,
    duplicates      bigint NOT NULL DEFAULT 0,
    invalid         bigint NOT NULL DEFAULT 0,
    -- resume point: byte offset and row number after the last committed batch
    checkpoint_offset bigint NOT NULL DEFAULT 0,
    checkpoint_row  bigint NOT NULL DEFAULT 0,
    error           text,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX imports_status_idx ON imports (status) WHERE status IN ('queued', 'running');
CREATE INDEX imports_created_idx ON imports (created_at DESC);

CREATE TABLE import_errors (
    import_id   bigint NOT NULL REFERENCES imports (id) ON DELETE CASCADE,
    line        bigint NOT NULL,
    reason      text NOT NULL,
    raw         text NOT NULL DEFAULT '',
    PRIMARY KEY (import_id, line)
);

CREATE TABLE leads (
    id          bigserial PRIMARY KEY,
    email       text NOT NULL,
    first_name  text,
    last_name   text,
    company     text,
    phone       text,
    tags        text[] NOT NULL DEFAULT '{}',
    attributes  jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'unsubscribed', 'bounced', 'complained')),
    source      text,
    import_id   bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX leads_email_lower_key ON leads (lower(email));
CREATE INDEX leads_tags_gin ON leads USING gin (tags);
CREATE INDEX leads_status_idx ON leads (status);
CREATE INDEX leads_created_idx ON leads (created_at);

CREATE TABLE campaigns (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    subject     text NOT NULL,
    from_email  text NOT NULL,
    html        text NOT NULL DEFAULT '',
    text        text NOT NULL DEFAULT '',
    segment     jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'draft'
                CHECK (status IN ('draft', 'queued', 'sending', 'paused', 'sent', 'failed', 'cancelled')),
    -- counts kept up to date by set-based updates, so reads never scan messages
    recipients  bigint NOT NULL DEFAULT 0,
    queued      bigint NOT NULL DEFAULT 0,
    sent        bigint NOT NULL DEFAULT 0,
    delivered   bigint NOT NULL DEFAULT 0,
    bounced     bigint NOT NULL DEFAULT 0,
    complained  bigint NOT NULL DEFAULT 0,
    opened      bigint NOT NULL DEFAULT 0,
    clicked     bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX campaigns_status_idx ON campaigns (status);
CREATE INDEX campaigns_created_idx ON campaigns (created_at DESC);

CREATE TABLE messages (
    id          bigserial PRIMARY KEY,
    campaign_id bigint REFERENCES campaigns (id) ON DELETE CASCADE,
    lead_id     bigint REFERENCES leads (id) ON DELETE SET NULL,
    email       text NOT NULL,
    batch       integer,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')),
    delivery    text,            -- last provider event: delivered, bounced, complained, delayed
    provider    text,
    provider_message_id text,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    idempotency_key text,        -- transactional emails: the client's Idempotency-Key
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    delivered_at timestamptz,
    opened_at   timestamptz,
    clicked_at  timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX messages_campaign_lead_key ON messages (campaign_id, lead_id) WHERE campaign_id IS NOT NULL;
CREATE INDEX messages_campaign_batch_idx ON messages (campaign_id, batch);
CREATE INDEX messages_provider_id_idx ON messages (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE INDEX messages_failed_idx ON messages (campaign_id) WHERE status = 'failed';
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE email_events (
    id          bigserial PRIMARY KEY,
    provider    text NOT NULL,
    event_id    text NOT NULL,   -- svix-id: the dedup key
    type        text NOT NULL,
    message_id  bigint REFERENCES messages (id) ON DELETE SET NULL,
    provider_message_id text,
    payload     jsonb NOT NULL DEFAULT '{}',
    occurred_at timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, event_id)
);
CREATE INDEX email_events_received_idx ON email_events (received_at);

CREATE TABLE links (
    id          bigserial PRIMARY KEY,
    campaign_id bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    url         text NOT NULL,
    UNIQUE (campaign_id, url)
);

CREATE TABLE incidents (
    id          bigserial PRIMARY KEY,
    fingerprint text NOT NULL,
    alertname   text NOT NULL,
    severity    text NOT NULL DEFAULT 'warning',
    service     text,
    summary     text,
    description text,
    labels      jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    started_at  timestamptz NOT NULL,
    resolved_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (fingerprint, started_at)
);
CREATE INDEX incidents_open_idx ON incidents (status) WHERE status = 'open';
CREATE INDEX incidents_started_idx ON incidents (started_at DESC);
