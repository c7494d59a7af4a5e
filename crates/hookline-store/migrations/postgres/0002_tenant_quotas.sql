-- Per-tenant quotas (issue #9): NULL means the server's default (settings
-- `quota_subscriptions_per_tenant`, `quota_deliveries_per_event`, `quota_events_per_second`).
ALTER TABLE tenants
    ADD COLUMN max_subscriptions        integer NULL,
    ADD COLUMN max_deliveries_per_event integer NULL,
    ADD COLUMN max_events_per_second    integer NULL,
    ADD CONSTRAINT tenants_quotas_positive CHECK (
        (max_subscriptions IS NULL OR max_subscriptions > 0)
        AND (max_deliveries_per_event IS NULL OR max_deliveries_per_event > 0)
        AND (max_events_per_second IS NULL OR max_events_per_second > 0)
    );
