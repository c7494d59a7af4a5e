-- Fair delivery (issue 11): a tenant's weight, set by an admin. NULL means 1. Its
-- deliveries spread over 2 x weight shard queues (hookline_broker::shards).
ALTER TABLE tenants
    ADD COLUMN weight integer NULL,
    ADD CONSTRAINT tenants_weight_range CHECK (weight IS NULL OR weight BETWEEN 1 AND 16);
