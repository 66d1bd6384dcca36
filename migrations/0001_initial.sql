-- Parley's core schema. Times are epoch milliseconds (INTEGER); JSON columns hold msgspec-encoded text.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    key_prefix  TEXT NOT NULL,
    expires_at  INTEGER,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX api_keys_org ON api_keys (org_id, created_at);

-- Managed agents (org_id NULL, slug set) and custom agents (org_id set, slug NULL).
CREATE TABLE agents (
    id                          TEXT PRIMARY KEY,
    kind                        TEXT NOT NULL CHECK (kind IN ('managed', 'custom')),
    slug                        TEXT UNIQUE,
    org_id                      TEXT REFERENCES orgs(id),
    config                      TEXT NOT NULL,
    tool_secret                 TEXT NOT NULL,
    previous_tool_secret        TEXT,
    previous_tool_secret_until  INTEGER,
    created_at                  INTEGER NOT NULL,
    updated_at                  INTEGER NOT NULL,
    deleted_at                  INTEGER
);
CREATE INDEX agents_org ON agents (org_id, created_at);

CREATE TABLE conversations (
    id                          TEXT PRIMARY KEY,
    org_id                      TEXT NOT NULL REFERENCES orgs(id),
    agent_id                    TEXT NOT NULL REFERENCES agents(id),
    status                      TEXT NOT NULL CHECK (status IN ('pending', 'in_progress', 'closed')),
    from_number                 TEXT NOT NULL,
    to_number                   TEXT NOT NULL,
    dynamic_variables           TEXT NOT NULL,
    metadata                    TEXT NOT NULL,
    inactivity_timeout_seconds  INTEGER NOT NULL,
    created_at                  INTEGER NOT NULL,
    last_activity_at            INTEGER NOT NULL,
    ended_at                    INTEGER,
    end_reason                  TEXT,
    superseded_by               TEXT,
    assistant_paused            INTEGER NOT NULL DEFAULT 0,
    message_count               INTEGER NOT NULL DEFAULT 0,
    last_message_seq            INTEGER NOT NULL DEFAULT 0,
    last_event_seq              INTEGER NOT NULL DEFAULT 0
);
-- At most one in_progress conversation per (our number, customer number) pair.
CREATE UNIQUE INDEX conversations_one_open_per_pair
    ON conversations (from_number, to_number) WHERE status = 'in_progress';
CREATE INDEX conversations_pair ON conversations (from_number, to_number, created_at);
CREATE INDEX conversations_org_created ON conversations (org_id, created_at, id);
CREATE INDEX conversations_pending ON conversations (status) WHERE status = 'pending';

CREATE TABLE messages (
    id                   TEXT PRIMARY KEY,
    conversation_id      TEXT REFERENCES conversations(id),
    org_id               TEXT REFERENCES orgs(id),
    seq                  INTEGER,
    direction            TEXT NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    author               TEXT NOT NULL CHECK (author IN ('agent', 'customer', 'operator', 'system')),
    from_number          TEXT NOT NULL,
    to_number            TEXT NOT NULL,
    content              TEXT NOT NULL,
    status               TEXT NOT NULL,
    provider             TEXT NOT NULL,
    provider_message_id  TEXT,
    error_code           TEXT,
    encoding             TEXT NOT NULL,
    segments             INTEGER NOT NULL,
    created_at           INTEGER NOT NULL,
    sent_at              INTEGER,
    delivered_at         INTEGER,
    updated_at           INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE INDEX messages_provider_id ON messages (provider_message_id);
CREATE UNIQUE INDEX messages_inbound_dedupe ON messages (provider, provider_message_id)
    WHERE direction = 'inbound' AND provider_message_id IS NOT NULL;
CREATE INDEX messages_to_number ON messages (to_number, created_at) WHERE direction = 'outbound';
CREATE INDEX messages_unfinished ON messages (updated_at) WHERE status IN ('queued', 'sent');

-- Every raw provider status report, kept for audit; `applied` says whether it changed the message.
CREATE TABLE status_reports (
    id                   INTEGER PRIMARY KEY,
    message_id           TEXT,
    provider             TEXT NOT NULL,
    provider_message_id  TEXT,
    provider_status      TEXT NOT NULL,
    error_code           TEXT,
    raw                  TEXT NOT NULL,
    applied              INTEGER NOT NULL,
    received_at          INTEGER NOT NULL
);
CREATE INDEX status_reports_dedupe ON status_reports (provider_message_id, provider_status);

-- The outbox: every event is written in the same transaction as the change it describes.
CREATE TABLE events (
    pos              INTEGER PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    conversation_id  TEXT,
    sequence         INTEGER,
    type             TEXT NOT NULL,
    payload          TEXT NOT NULL,
    created_at       INTEGER NOT NULL
);
CREATE INDEX events_org ON events (org_id, pos);
CREATE INDEX events_conversation ON events (conversation_id, pos);

CREATE TABLE idempotency_keys (
    org_id        TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('running', 'done')),
    outcome       TEXT,
    conversation_id TEXT,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    PRIMARY KEY (org_id, key)
);
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);

CREATE TABLE opt_outs (
    org_id         TEXT NOT NULL,
    sender_number  TEXT NOT NULL,
    phone_number   TEXT NOT NULL,
    keyword        TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (org_id, sender_number, phone_number)
);

-- Timed work for the scheduler: one row per (kind, ref), claimed with a lease.
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    ref          TEXT NOT NULL,
    due_at       INTEGER NOT NULL,
    lease_until  INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    payload      TEXT,
    UNIQUE (kind, ref)
);
CREATE INDEX jobs_due ON jobs (due_at);
