-- Hookline's schema on SQLite, for the embedded (one-process) mode: the same tables,
-- constraints and indexes as migrations/postgres/0001_init.sql, adapted to SQLite.
--
-- Conventions (see src/sqlite.rs for the reasons):
-- * Ids are `<prefix>_<ULID>` TEXT. SQLite's default BINARY collation compares bytes, the
--   same order as PostgreSQL's "C" collation and Rust's `Ord`, so `ORDER BY id` is creation
--   order and the last id of a page is the cursor of the next.
-- * Every timestamp is an INTEGER of microseconds since the Unix epoch (UTC): the precision
--   of PostgreSQL's timestamptz, compared and sorted as plain integers. Text timestamps sort
--   correctly only if every writer used one fixed-width format, which sqlx's chrono encoding
--   does not (it drops trailing fractional digits). The store always writes these columns
--   itself; the defaults only serve hand-written SQL.
-- * JSON (objects of strings, event-type filters, channels, the retry schedule) is TEXT
--   holding JSON, checked with json_valid(); payloads and hashes are BLOBs.
-- * Tables are STRICT, so a value of the wrong type is refused instead of stored.
-- * Foreign keys are enforced only on connections with `PRAGMA foreign_keys = ON`, which the
--   store sets in its connect options. SQLite does not name the constraint a statement
--   violated, so the store checks what it must name (an unknown tenant of a batch) itself.
-- * Names starting with `broker_` belong to the embedded queue (hookline-broker), which keeps
--   its own tables in the same file; none is used here.

-- ---------------------------------------------------------------------------------------------
-- Control plane
-- ---------------------------------------------------------------------------------------------

CREATE TABLE tenants (
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT tenants_pkey PRIMARY KEY (id),
    CONSTRAINT tenants_metadata_json CHECK (json_valid(metadata))
) STRICT;

CREATE TABLE api_keys (
    id            TEXT NOT NULL,
    name          TEXT NOT NULL,
    -- NULL: an admin key, which may act on every tenant.
    tenant_id     TEXT NULL,
    token_prefix  TEXT NOT NULL,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash    BLOB NOT NULL,
    created_at    INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    revoked_at    INTEGER NULL,
    last_used_at  INTEGER NULL,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES tenants (id) ON DELETE CASCADE,
    -- Authentication looks a key up by the hash of the presented token on every call.
    CONSTRAINT api_keys_token_hash_key UNIQUE (token_hash),
    CONSTRAINT api_keys_token_hash_len CHECK (length(token_hash) = 32)
) STRICT;
-- Listing the keys of a tenant (or the admin keys, tenant_id IS NULL) in id order; also
-- serves the cascade from tenants.
CREATE INDEX api_keys_tenant_id_idx ON api_keys (tenant_id, id);

CREATE TABLE event_types (
    name         TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    -- Optional JSON Schema of the payload.
    schema       TEXT NULL,
    archived     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at   INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT event_types_pkey PRIMARY KEY (name),
    CONSTRAINT event_types_schema_json CHECK (schema IS NULL OR json_valid(schema)),
    CONSTRAINT event_types_archived_bool CHECK (archived IN (0, 1))
) STRICT;

CREATE TABLE subscriptions (
    id                     TEXT NOT NULL,
    tenant_id              TEXT NOT NULL,
    url                    TEXT NOT NULL,
    description            TEXT NOT NULL DEFAULT '',
    -- Event-type filters (`invoice.paid`, `invoice.*`), a JSON array of strings; empty:
    -- every event type.
    event_types            TEXT NOT NULL DEFAULT '[]',
    -- A JSON array of strings. Empty: events of every channel (and of none).
    channels               TEXT NOT NULL DEFAULT '[]',
    -- Extra HTTP headers, a JSON object of strings.
    headers                TEXT NOT NULL DEFAULT '{}',
    -- NULL: no limit.
    rate_limit_per_second  INTEGER NULL,
    max_in_flight          INTEGER NULL,
    -- Delays before each retry in milliseconds, a JSON array of integers; NULL: the default
    -- schedule.
    retry_schedule_ms      TEXT NULL,
    state                  TEXT NOT NULL DEFAULT 'enabled',
    disabled_reason        TEXT NULL,
    metadata               TEXT NOT NULL DEFAULT '{}',
    created_at             INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at             INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT subscriptions_pkey PRIMARY KEY (id),
    CONSTRAINT subscriptions_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES tenants (id) ON DELETE CASCADE,
    CONSTRAINT subscriptions_state_check CHECK (state IN ('enabled', 'disabled')),
    CONSTRAINT subscriptions_rate_limit_check
        CHECK (rate_limit_per_second IS NULL OR rate_limit_per_second >= 0),
    CONSTRAINT subscriptions_max_in_flight_check
        CHECK (max_in_flight IS NULL OR max_in_flight >= 0),
    CONSTRAINT subscriptions_json CHECK (
        json_valid(event_types) AND json_valid(channels) AND json_valid(headers)
        AND json_valid(metadata)
        AND (retry_schedule_ms IS NULL OR json_valid(retry_schedule_ms)))
) STRICT;
-- ListSubscriptions of a tenant in id order; also serves the cascade from tenants.
CREATE INDEX subscriptions_tenant_id_idx ON subscriptions (tenant_id, id);
-- MatchSubscriptions: every enabled subscription of a tenant, on each publish (cache miss).
CREATE INDEX subscriptions_enabled_idx ON subscriptions (tenant_id, id)
    WHERE state = 'enabled';

CREATE TABLE subscription_secrets (
    id               TEXT NOT NULL,
    subscription_id  TEXT NOT NULL,
    -- `whsec_` + base64 of the key bytes. Needed in clear to sign.
    secret           TEXT NOT NULL,
    created_at       INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    -- NULL: the current secret. Set when rotated out; signing stops at that time.
    expires_at       INTEGER NULL,
    CONSTRAINT subscription_secrets_pkey PRIMARY KEY (id),
    CONSTRAINT subscription_secrets_subscription_fkey FOREIGN KEY (subscription_id)
        REFERENCES subscriptions (id) ON DELETE CASCADE
) STRICT;
-- The live secrets of a subscription, read by dispatchers to sign; serves the cascade.
CREATE INDEX subscription_secrets_subscription_id_idx
    ON subscription_secrets (subscription_id);
-- At most one current secret per subscription: a rotation expires the old one first.
CREATE UNIQUE INDEX subscription_secrets_one_current_idx
    ON subscription_secrets (subscription_id)
    WHERE expires_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Data plane
-- ---------------------------------------------------------------------------------------------

CREATE TABLE events (
    id               TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    -- The JSON exactly as published (bytes: signatures cover these exact bytes).
    payload          BLOB NOT NULL,
    -- A JSON array of strings.
    channels         TEXT NOT NULL DEFAULT '[]',
    idempotency_key  TEXT NULL,
    created_at       INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT events_pkey PRIMARY KEY (id),
    CONSTRAINT events_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES tenants (id) ON DELETE CASCADE,
    CONSTRAINT events_channels_json CHECK (json_valid(channels))
) STRICT;
-- Publish with an idempotency key: a repeat finds the first event instead of a duplicate.
CREATE UNIQUE INDEX events_idempotency_key_idx ON events (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- ListEvents of a tenant in id order; also serves the cascade from tenants.
CREATE INDEX events_tenant_id_idx ON events (tenant_id, id);
-- ListEvents of a tenant filtered by event type.
CREATE INDEX events_tenant_event_type_idx ON events (tenant_id, event_type, id);

-- Small rows looked up by their text key on every attempt: WITHOUT ROWID keeps them in the
-- primary-key B-tree itself (one look-up instead of index, then table).
CREATE TABLE deliveries (
    id                TEXT NOT NULL,
    event_id          TEXT NOT NULL,
    -- Denormalised from the event for tenant-scoped listing; the event's cascade removes
    -- the row when the tenant goes, so no foreign key (one less check per insert).
    tenant_id         TEXT NOT NULL,
    subscription_id   TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending',
    attempt_count     INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER NULL,
    last_attempt_at   INTEGER NULL,
    last_status_code  INTEGER NULL,
    last_error        TEXT NULL,
    -- W3C traceparent of the publish that created the delivery (when it was traced):
    -- jobs rebuilt from this row for retries link their spans to that trace.
    traceparent       TEXT NULL,
    created_at        INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at        INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT deliveries_pkey PRIMARY KEY (id),
    CONSTRAINT deliveries_event_fkey FOREIGN KEY (event_id)
        REFERENCES events (id) ON DELETE CASCADE,
    CONSTRAINT deliveries_subscription_fkey FOREIGN KEY (subscription_id)
        REFERENCES subscriptions (id) ON DELETE CASCADE,
    -- One delivery per (event, subscription): a retried publish cannot fan out twice.
    -- Also the lookup of an event's deliveries (GetEvent) and the cascade from events.
    CONSTRAINT deliveries_event_subscription_key UNIQUE (event_id, subscription_id),
    CONSTRAINT deliveries_status_check
        CHECK (status IN ('pending', 'retrying', 'succeeded', 'failed')),
    CONSTRAINT deliveries_attempt_count_check CHECK (attempt_count >= 0)
) STRICT, WITHOUT ROWID;
-- ListDeliveries of a subscription in id order; also serves the cascade from subscriptions.
CREATE INDEX deliveries_subscription_id_idx ON deliveries (subscription_id, id);
-- ListDeliveries of a tenant in id order.
CREATE INDEX deliveries_tenant_id_idx ON deliveries (tenant_id, id);
-- ListDeliveries of a tenant filtered by status.
CREATE INDEX deliveries_tenant_status_idx ON deliveries (tenant_id, status, id);
-- ReplayFailed: the failed deliveries of a subscription since a time (ids are time-ordered,
-- so "since" is a range on id). Partial: failed deliveries are few.
CREATE INDEX deliveries_failed_idx ON deliveries (subscription_id, id)
    WHERE status = 'failed';
-- Following changes as they happen (WatchDeliveries): `updated_at > ?after ORDER BY updated_at`,
-- of one tenant or of all.
CREATE INDEX deliveries_tenant_updated_at_idx ON deliveries (tenant_id, updated_at);
CREATE INDEX deliveries_updated_at_idx ON deliveries (updated_at);

-- Deliveries committed whose queue publish is not yet confirmed. Ingest (and the retry
-- scheduler, and manual retries) insert a row in the same transaction as the change and delete
-- it after the queue confirms; a relay re-publishes rows older than a grace period (crash
-- between commit and publish), leasing them first so that relays do not publish the same row
-- at once.
CREATE TABLE delivery_outbox (
    delivery_id   TEXT NOT NULL,
    created_at    INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    -- A relay's lease: until then no other relay takes the row. NULL: never leased.
    leased_until  INTEGER NULL,
    CONSTRAINT delivery_outbox_pkey PRIMARY KEY (delivery_id),
    CONSTRAINT delivery_outbox_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
-- The relay scans the oldest unconfirmed rows first.
CREATE INDEX delivery_outbox_created_at_idx ON delivery_outbox (created_at);

CREATE TABLE attempts (
    id                TEXT NOT NULL,
    delivery_id       TEXT NOT NULL,
    -- 1 for the first attempt.
    attempt_number    INTEGER NOT NULL,
    started_at        INTEGER NOT NULL,
    duration_ms       INTEGER NOT NULL,
    status_code       INTEGER NULL,
    error_class       TEXT NULL,
    error_message     TEXT NULL,
    -- A bounded excerpt of the response body.
    response_excerpt  BLOB NOT NULL DEFAULT x'',
    CONSTRAINT attempts_pkey PRIMARY KEY (id),
    CONSTRAINT attempts_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE,
    -- A redelivered message cannot record the same attempt twice. Also ListAttempts of a
    -- delivery in order, and the cascade from deliveries.
    CONSTRAINT attempts_delivery_attempt_key UNIQUE (delivery_id, attempt_number),
    CONSTRAINT attempts_attempt_number_check CHECK (attempt_number >= 1),
    CONSTRAINT attempts_duration_check CHECK (duration_ms >= 0),
    CONSTRAINT attempts_error_class_check CHECK (error_class IS NULL OR error_class IN
        ('timeout', 'connect', 'dns', 'tls', 'body', 'status', 'invalid'))
) STRICT;

-- The durable retry schedule: one row per delivery waiting for its next attempt. Due rows are
-- claimed in batches inside one write transaction (SQLite has one writer at a time, so the
-- transaction is exclusive and nothing needs skipping), moved to the outbox, and deleted.
CREATE TABLE retry_schedule (
    delivery_id     TEXT NOT NULL,
    due_at          INTEGER NOT NULL,
    attempt_number  INTEGER NOT NULL,
    CONSTRAINT retry_schedule_pkey PRIMARY KEY (delivery_id),
    CONSTRAINT retry_schedule_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
-- The scheduler's poll: `WHERE due_at <= ?now ORDER BY due_at LIMIT n`.
CREATE INDEX retry_schedule_due_at_idx ON retry_schedule (due_at);
