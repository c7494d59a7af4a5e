-- Hookline's schema for the whole pipeline: control plane (tenants, API keys, event types,
-- subscriptions, secrets) and data plane (events, deliveries, outbox, attempts, retry schedule).
--
-- Conventions:
-- * Ids are `<prefix>_<ULID>` text. ULIDs sort by creation time, so `ORDER BY id` is creation
--   order and the last id of a page is the cursor of the next. Id columns use the "C"
--   collation: byte order (the same order as Rust's `Ord` on `Id`, whatever the database's
--   locale) and cheaper comparisons than a linguistic collation.
-- * Every timestamp is timestamptz.
-- * Constraints are named so the store can turn a violation into an actionable message.

-- ---------------------------------------------------------------------------------------------
-- Control plane
-- ---------------------------------------------------------------------------------------------

CREATE TABLE tenants (
    id          text COLLATE "C" NOT NULL,
    name        text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenants_pkey PRIMARY KEY (id)
);

CREATE TABLE api_keys (
    id            text COLLATE "C" NOT NULL,
    name          text NOT NULL,
    -- NULL: an admin key, which may act on every tenant.
    tenant_id     text COLLATE "C" NULL,
    token_prefix  text NOT NULL,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash    bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz NULL,
    last_used_at  timestamptz NULL,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES tenants (id) ON DELETE CASCADE,
    -- Authentication looks a key up by the hash of the presented token on every call.
    CONSTRAINT api_keys_token_hash_key UNIQUE (token_hash),
    CONSTRAINT api_keys_token_hash_len CHECK (octet_length(token_hash) = 32)
);
-- Listing the keys of a tenant (or the admin keys, tenant_id IS NULL) in id order; also
-- serves the cascade from tenants.
CREATE INDEX api_keys_tenant_id_idx ON api_keys (tenant_id, id);

CREATE TABLE event_types (
    name         text COLLATE "C" NOT NULL,
    description  text NOT NULL DEFAULT '',
    -- Optional JSON Schema of the payload.
    schema       jsonb NULL,
    archived     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_types_pkey PRIMARY KEY (name)
);

CREATE TABLE subscriptions (
    id                     text COLLATE "C" NOT NULL,
    tenant_id              text COLLATE "C" NOT NULL,
    url                    text NOT NULL,
    description            text NOT NULL DEFAULT '',
    -- Event-type filters (`invoice.paid`, `invoice.*`); empty: every event type.
    event_types            text[] NOT NULL DEFAULT '{}',
    -- Empty: events of every channel (and of none).
    channels               text[] NOT NULL DEFAULT '{}',
    -- Extra HTTP headers, a JSON object of strings.
    headers                jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- NULL: no limit.
    rate_limit_per_second  integer NULL,
    max_in_flight          integer NULL,
    -- Delays before each retry in milliseconds; NULL: the default schedule.
    retry_schedule_ms      bigint[] NULL,
    state                  text NOT NULL DEFAULT 'enabled',
    disabled_reason        text NULL,
    metadata               jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_pkey PRIMARY KEY (id),
    CONSTRAINT subscriptions_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES tenants (id) ON DELETE CASCADE,
    CONSTRAINT subscriptions_state_check CHECK (state IN ('enabled', 'disabled')),
    CONSTRAINT subscriptions_rate_limit_check
        CHECK (rate_limit_per_second IS NULL OR rate_limit_per_second >= 0),
    CONSTRAINT subscriptions_max_in_flight_check
        CHECK (max_in_flight IS NULL OR max_in_flight >= 0)
);
-- ListSubscriptions of a tenant in id order; also serves the cascade from tenants.
CREATE INDEX subscriptions_tenant_id_idx ON subscriptions (tenant_id, id);
-- MatchSubscriptions: every enabled subscription of a tenant, on each publish (cache miss).
CREATE INDEX subscriptions_enabled_idx ON subscriptions (tenant_id, id)
    WHERE state = 'enabled';

CREATE TABLE subscription_secrets (
    id               text COLLATE "C" NOT NULL,
    subscription_id  text COLLATE "C" NOT NULL,
    -- `whsec_` + base64 of the key bytes. Needed in clear to sign.
    secret           text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- NULL: the current secret. Set when rotated out; signing stops at that time.
    expires_at       timestamptz NULL,
    CONSTRAINT subscription_secrets_pkey PRIMARY KEY (id),
    CONSTRAINT subscription_secrets_subscription_fkey FOREIGN KEY (subscription_id)
        REFERENCES subscriptions (id) ON DELETE CASCADE
);
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
    id               text COLLATE "C" NOT NULL,
    tenant_id        text COLLATE "C" NOT NULL,
    event_type       text COLLATE "C" NOT NULL,
    -- The JSON exactly as published (bytes, not jsonb: signatures cover these exact bytes).
    payload          bytea NOT NULL,
    channels         text[] NOT NULL DEFAULT '{}',
    idempotency_key  text NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (id),
    CONSTRAINT events_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES tenants (id) ON DELETE CASCADE
);
-- Publish with an idempotency key: a repeat finds the first event instead of a duplicate.
CREATE UNIQUE INDEX events_idempotency_key_idx ON events (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- ListEvents of a tenant in id order; also serves the cascade from tenants.
CREATE INDEX events_tenant_id_idx ON events (tenant_id, id);
-- ListEvents of a tenant filtered by event type.
CREATE INDEX events_tenant_event_type_idx ON events (tenant_id, event_type, id);

-- Rows here are updated on every attempt; leave room on each page for the new row versions.
CREATE TABLE deliveries (
    id                text COLLATE "C" NOT NULL,
    event_id          text COLLATE "C" NOT NULL,
    -- Denormalised from the event for tenant-scoped listing; the event's cascade removes
    -- the row when the tenant goes, so no foreign key (one less check per insert).
    tenant_id         text COLLATE "C" NOT NULL,
    subscription_id   text COLLATE "C" NOT NULL,
    event_type        text COLLATE "C" NOT NULL,
    status            text NOT NULL DEFAULT 'pending',
    attempt_count     integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NULL,
    last_attempt_at   timestamptz NULL,
    last_status_code  integer NULL,
    last_error        text NULL,
    -- W3C traceparent of the publish that created the delivery (when it was traced):
    -- jobs rebuilt from this row for retries link their spans to that trace.
    traceparent       text NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
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
) WITH (fillfactor = 90);
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
-- Following changes as they happen (WatchDeliveries): `updated_at > $after ORDER BY updated_at`,
-- of one tenant or of all. Status changes already rule out HOT updates (status is indexed),
-- so these add an index entry per update, not a lost HOT update.
CREATE INDEX deliveries_tenant_updated_at_idx ON deliveries (tenant_id, updated_at);
CREATE INDEX deliveries_updated_at_idx ON deliveries (updated_at);

-- Deliveries committed whose queue publish is not yet confirmed. Ingest (and the retry
-- scheduler, and manual retries) insert a row in the same transaction as the change and delete
-- it after the broker confirms; a relay re-publishes rows older than a grace period (crash
-- between commit and publish), leasing them first so that relays do not publish the same row
-- at once.
CREATE TABLE delivery_outbox (
    delivery_id   text COLLATE "C" NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- A relay's lease: until then no other relay takes the row. NULL: never leased.
    leased_until  timestamptz NULL,
    CONSTRAINT delivery_outbox_pkey PRIMARY KEY (delivery_id),
    CONSTRAINT delivery_outbox_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE
);
-- The relay scans the oldest unconfirmed rows first.
CREATE INDEX delivery_outbox_created_at_idx ON delivery_outbox (created_at);

CREATE TABLE attempts (
    id                text COLLATE "C" NOT NULL,
    delivery_id       text COLLATE "C" NOT NULL,
    -- 1 for the first attempt.
    attempt_number    integer NOT NULL,
    started_at        timestamptz NOT NULL,
    duration_ms       integer NOT NULL,
    status_code       integer NULL,
    error_class       text NULL,
    error_message     text NULL,
    -- A bounded excerpt of the response body.
    response_excerpt  bytea NOT NULL DEFAULT '\x'::bytea,
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
);

-- The durable retry schedule: one row per delivery waiting for its next attempt. Due rows are
-- claimed in batches with FOR UPDATE SKIP LOCKED (on their deliveries: every writer locks the
-- delivery before its schedule row, so no two can deadlock), moved to the outbox, and deleted.
CREATE TABLE retry_schedule (
    delivery_id     text COLLATE "C" NOT NULL,
    due_at          timestamptz NOT NULL,
    attempt_number  integer NOT NULL,
    CONSTRAINT retry_schedule_pkey PRIMARY KEY (delivery_id),
    CONSTRAINT retry_schedule_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE
);
-- The scheduler's poll: `WHERE due_at <= now() ORDER BY due_at LIMIT n`.
CREATE INDEX retry_schedule_due_at_idx ON retry_schedule (due_at);
