-- Schema of the embedded queue (src/embedded.rs), kept in the SQLite database
-- that the embedded mode shares with hookline-store.
--
-- EmbeddedBroker::open runs this whole script in one transaction on every
-- start, so every statement must be idempotent. It deliberately does not go
-- through sqlx's migrator: that keeps its bookkeeping in `_sqlx_migrations`,
-- which the store's migrator owns in the same database, and two migrators with
-- different migration sets in one table refuse each other. Every object is
-- named `broker_*` so that it never clashes with a table of the store.
--
-- A later, incompatible change bumps `schema_version` and adds its own
-- idempotent statements below; open() refuses a database whose version is
-- newer than the code.

CREATE TABLE IF NOT EXISTS broker_meta (
    key   TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

INSERT INTO broker_meta (key, value) VALUES ('schema_version', 1)
    ON CONFLICT (key) DO NOTHING;

-- One row per message of every queue, the dead-letter queue included.
CREATE TABLE IF NOT EXISTS broker_messages (
    -- AUTOINCREMENT: ids are never reused, so a stale acknowledgement can
    -- never hit a later message, and ids give publication order.
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- 'deliveries', 'retries', a shard 'deliveries.<i>' / 'retries.<i>', or
    -- 'dead-letter'.
    queue          TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    -- JSON object of string headers.
    headers        TEXT    NOT NULL,
    -- Unix milliseconds from which the message may be claimed. A claim moves
    -- it to claim time + visibility timeout (renewed while the holder lives).
    visible_at     INTEGER NOT NULL,
    -- Number of times the message was handed to a consumer.
    delivery_count INTEGER NOT NULL DEFAULT 0,
    -- Token of the latest claim (0: never claimed). Settling checks it, so
    -- only the current holder can settle.
    lease          INTEGER NOT NULL DEFAULT 0,
    -- Unix milliseconds of publication (age metrics, dead-letter inspection).
    published_at   INTEGER NOT NULL
) STRICT;

-- Claims walk this index in (visible_at, id) order and stop after a batch;
-- queue depth counts a range of it.
CREATE INDEX IF NOT EXISTS broker_messages_ready
    ON broker_messages (queue, visible_at, id);
