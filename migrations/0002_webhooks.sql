-- Webhook endpoints, one delivery per (endpoint, event), and the log of every attempt.

CREATE TABLE webhooks (
    id                     TEXT PRIMARY KEY,
    org_id                 TEXT NOT NULL REFERENCES orgs(id),
    url                    TEXT NOT NULL,
    events                 TEXT NOT NULL,             -- JSON array of event types, or ["*"]
    is_active              INTEGER NOT NULL DEFAULT 1,
    secret                 TEXT NOT NULL,
    previous_secret        TEXT,                      -- still signs, beside `secret`, until the time below
    previous_secret_until  INTEGER,
    disabled_reason        TEXT,                      -- why the server disabled it (gone, failing)
    failing_since          INTEGER,                   -- first failed attempt since the last success
    last_success_at        INTEGER,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL
);
CREATE INDEX webhooks_org ON webhooks (org_id, created_at, id);
CREATE INDEX webhooks_org_active ON webhooks (org_id) WHERE is_active = 1;

-- One row per event per endpoint: its id is stable across retries, so at most one attempt of an event
-- to an endpoint can hold the lease at a time. `attempt_count` counts scheduled attempts in this run of
-- the retry schedule (recover resets it); manual attempts do not count.
CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    webhook_id       TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    org_id           TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempt_count    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    lease_until      INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (lease_until) WHERE lease_until IS NOT NULL;

CREATE TABLE webhook_attempts (
    id             INTEGER PRIMARY KEY,
    delivery_id    TEXT NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    at             INTEGER NOT NULL,
    status_code    INTEGER NOT NULL,                  -- 0 = no response
    duration_ms    INTEGER NOT NULL,
    error          TEXT,
    response_body  TEXT,
    manual         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
