-- What a subscription's requests carry: the payload as published ('raw', the behaviour
-- before this column) or the Standard Webhooks envelope {"type", "timestamp", "data"}.
ALTER TABLE subscriptions ADD COLUMN payload_format TEXT NOT NULL DEFAULT 'raw'
    CONSTRAINT subscriptions_payload_format_check CHECK (payload_format IN ('raw', 'envelope'));
