-- Per-tenant quotas (issue #9): NULL means the server's default (settings
-- `quota_subscriptions_per_tenant`, `quota_deliveries_per_event`, `quota_events_per_second`).
-- Held to PostgreSQL's `integer` range, like every stored integer of this adapter.
ALTER TABLE tenants ADD COLUMN max_subscriptions INTEGER NULL
    CHECK (max_subscriptions IS NULL OR max_subscriptions BETWEEN 1 AND 2147483647);
ALTER TABLE tenants ADD COLUMN max_deliveries_per_event INTEGER NULL
    CHECK (max_deliveries_per_event IS NULL OR max_deliveries_per_event BETWEEN 1 AND 2147483647);
ALTER TABLE tenants ADD COLUMN max_events_per_second INTEGER NULL
    CHECK (max_events_per_second IS NULL OR max_events_per_second BETWEEN 1 AND 2147483647);
