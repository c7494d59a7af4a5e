-- Attempts refused by the egress policy (no connection made) have their own error class.
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt with the new one
-- (nothing references attempts, so dropping the old table cascades nowhere).
CREATE TABLE attempts_new (
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
        ('timeout', 'connect', 'dns', 'tls', 'body', 'status', 'invalid', 'egress'))
) STRICT;
INSERT INTO attempts_new SELECT * FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_new RENAME TO attempts;
