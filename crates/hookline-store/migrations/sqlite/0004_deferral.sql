-- Why a delivery was last put off without an attempt (`circuit_open`, `in_flight`,
-- `rate_limit`); NULL once an attempt is recorded. It runs again at `next_attempt_at`.
ALTER TABLE deliveries ADD COLUMN deferred_reason TEXT NULL;
-- Until when a dispatcher's circuit breaker holds deliveries to this subscription back
-- (microseconds since the epoch); NULL when closed. Written by the dispatcher on
-- transitions (the latest opening wins).
ALTER TABLE subscriptions ADD COLUMN circuit_open_until INTEGER NULL;
