-- Ordered delivery (issue #11, part 2): a subscription may ask for its deliveries one at a
-- time, in publish order. See docs/ARCHITECTURE.md "Ordered delivery".
ALTER TABLE subscriptions ADD COLUMN ordering TEXT NOT NULL DEFAULT 'unordered'
    CONSTRAINT subscriptions_ordering_check CHECK (ordering IN ('unordered', 'ordered'));

-- The place of a delivery of an ordered subscription in its queue: one more than the
-- highest given so far (one writer: insertion order is publish order). NULL for every other
-- delivery (unordered subscriptions, and deliveries released from the order).
ALTER TABLE deliveries ADD COLUMN seq INTEGER NULL;
-- The highest seq given, and the next delivery of an ordered subscription (lowest seq still
-- pending). Partial, so unordered deliveries are not in them.
CREATE INDEX deliveries_seq_idx ON deliveries (seq) WHERE seq IS NOT NULL;
CREATE INDEX deliveries_ordered_idx ON deliveries (subscription_id, seq)
    WHERE seq IS NOT NULL AND status = 'pending';

-- The one delivery of an ordered subscription that may be in the queue (or the retry
-- schedule) now; the others wait, pending with no outbox row.
CREATE TABLE ordered_heads (
    subscription_id  TEXT NOT NULL,
    delivery_id      TEXT NOT NULL,
    CONSTRAINT ordered_heads_pkey PRIMARY KEY (subscription_id),
    CONSTRAINT ordered_heads_delivery_key UNIQUE (delivery_id),
    CONSTRAINT ordered_heads_subscription_fkey FOREIGN KEY (subscription_id)
        REFERENCES subscriptions (id) ON DELETE CASCADE,
    CONSTRAINT ordered_heads_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES deliveries (id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
