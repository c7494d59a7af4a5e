-- Ordered delivery (issue #11, part 2): a subscription may ask for its deliveries one at a
-- time, in publish order. See docs/ARCHITECTURE.md "Ordered delivery".
ALTER TABLE subscriptions ADD COLUMN ordering text NOT NULL DEFAULT 'unordered'
    CONSTRAINT subscriptions_ordering_check CHECK (ordering IN ('unordered', 'ordered'));

-- The place of a delivery of an ordered subscription in its queue: taken from this sequence
-- when the publish's transaction inserts it, so a publish acknowledged before another was
-- sent has the lower value. NULL for every other delivery (unordered subscriptions, and
-- deliveries released from the order: manual retries, a subscription made unordered).
CREATE SEQUENCE deliveries_seq AS bigint;
ALTER TABLE deliveries ADD COLUMN seq bigint NULL;
-- The next delivery of an ordered subscription: the lowest seq still pending. Partial, so
-- unordered deliveries are not in it.
CREATE INDEX deliveries_ordered_idx ON deliveries (subscription_id, seq)
    WHERE seq IS NOT NULL AND status = 'pending';

-- The one delivery of an ordered subscription that may be in the queue (or the retry
-- schedule) now; the others wait, pending with no outbox row. A row exists only while the
-- subscription has a head. Publishes upsert it (taking its lock), outcomes delete or move
-- it: the lock orders the two, so a delivery is never left waiting with no head.
CREATE TABLE ordered_heads (
    subscription_id  text COLLATE "C" NOT NULL,
    delivery_id      text COLLATE "C" NOT NULL,
    CONSTRAINT ordered_heads_pkey PRIMARY KEY (subscription_id),
    CONSTRAINT ordered_heads_delivery_key UNIQUE (delivery_id),
    CONSTRAINT ordered_heads_subscription_fkey FOREIGN KEY (subscription_id)
        REFERENCES subscriptions (id) ON DELETE CASCADE,
    CONSTRAINT ordered_heads_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE
);
