//! The SQL of the embedded queue: its schema, the statements the writer runs and the
//! encoding of their parameters. Kept apart so that the writer reads as a state machine.

use std::fmt::Write as _;
use std::sync::Arc;

use sqlx::sqlite::SqlitePool;

use crate::BrokerError;

/// The schema, run idempotently at every [`EmbeddedBroker::open`].
pub(super) const SCHEMA: &str = include_str!("../../sql/embedded_schema.sql");

/// The schema version this code writes and understands.
pub(super) const SCHEMA_VERSION: i64 = 1;

/// Queue name of dead-lettered messages in `broker_messages.queue`.
pub(super) const DEAD_LETTER_QUEUE: &str = "dead-letter";

/// Largest multi-row INSERT: 2^8 = 256 rows (5 parameters each, well under
/// SQLite's 32766). Smaller remainders are split in powers of two so that
/// only nine statement shapes exist and all stay in the statement cache.
pub(super) const MAX_INSERT_LOG2: usize = 8;

/// Claims up to `?5` visible messages of queue `?3` (now `?4`): hides them
/// until `?1`, counts the delivery, stamps lease `?2`.
pub(super) const CLAIM_SQL: &str = "\
UPDATE broker_messages
   SET visible_at = ?1, delivery_count = delivery_count + 1, lease = ?2
 WHERE id IN (SELECT id FROM broker_messages
               WHERE queue = ?3 AND visible_at <= ?4
               ORDER BY visible_at, id
               LIMIT ?5)
RETURNING id, body, headers, delivery_count";

/// Deletes the messages of the `[[id, lease], …]` JSON array `?1` that are
/// still held under that lease.
pub(super) const ACK_SQL: &str = "\
DELETE FROM broker_messages
 WHERE id IN (SELECT value ->> 0 FROM json_each(?1))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))
RETURNING id, lease";

/// Makes the held messages of `?2` visible again at `?1`.
pub(super) const REQUEUE_SQL: &str = "\
UPDATE broker_messages
   SET visible_at = ?1
 WHERE id IN (SELECT value ->> 0 FROM json_each(?2))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))
   AND queue <> 'dead-letter'
RETURNING id, lease";

/// Pushes the visibility of the held messages of `?2` out to `?1`.
pub(super) const RENEW_SQL: &str = "\
UPDATE broker_messages
   SET visible_at = ?1
 WHERE id IN (SELECT value ->> 0 FROM json_each(?2))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))
   AND queue <> 'dead-letter'";

/// Moves the held messages of `?3` to the dead-letter queue (visible at
/// `?1`), recording reason `?2` and the queue they came from.
pub(super) const DEAD_LETTER_SQL: &str = "\
UPDATE broker_messages
   SET queue = 'dead-letter',
       visible_at = ?1,
       headers = json_set(
           json_insert(
               CASE WHEN json_valid(headers) THEN headers ELSE '{}' END,
               '$.\"x-first-death-reason\"', ?2,
               '$.\"x-first-death-queue\"', queue),
           '$.\"x-last-death-reason\"', ?2,
           '$.\"x-last-death-queue\"', queue)
 WHERE id IN (SELECT value ->> 0 FROM json_each(?3))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?3))
   AND queue <> 'dead-letter'
RETURNING id, lease";

/// Creates the tables, checks the version and releases every held message,
/// in one transaction. Returns how many were released and the newest lease
/// token stored.
pub(super) async fn prepare_schema(pool: &SqlitePool, now: i64) -> Result<(u64, i64), BrokerError> {
    let context = "create the embedded queue's tables";
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| BrokerError::backend(context, e))?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut *tx)
        .await
        .map_err(|e| BrokerError::backend(context, e))?;
    let version: i64 =
        sqlx::query_scalar("SELECT value FROM broker_meta WHERE key = 'schema_version'")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| BrokerError::backend("read the embedded queue's schema version", e))?;
    if version > SCHEMA_VERSION {
        return Err(BrokerError::InvalidConfig(format!(
            "the database's queue tables have schema version {version}, written by a newer Hookline; this one understands up to {SCHEMA_VERSION}"
        )));
    }
    let leases: Vec<i64> = sqlx::query_scalar(
        "UPDATE broker_messages SET visible_at = ?1
          WHERE queue <> 'dead-letter' AND visible_at > ?1
         RETURNING lease",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| BrokerError::backend("release the messages held before the restart", e))?;
    tx.commit()
        .await
        .map_err(|e| BrokerError::backend(context, e))?;
    let released = u64::try_from(leases.len()).unwrap_or(u64::MAX);
    Ok((released, leases.into_iter().max().unwrap_or(0)))
}

/// The multi-row INSERT of `2^log2` messages.
pub(super) fn insert_sql(log2: usize) -> Arc<str> {
    let rows = vec!["(?, ?, ?, ?, ?)"; 1 << log2].join(", ");
    format!(
        "INSERT INTO broker_messages (queue, body, headers, visible_at, published_at) VALUES {rows}"
    )
    .into()
}

/// A `[[id, lease], …]` JSON array, the parameter of the settling statements.
pub(super) fn leases_json(leases: impl IntoIterator<Item = (i64, i64)>) -> String {
    let mut json = String::from("[");
    for (i, (id, lease)) in leases.into_iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(json, "[{id},{lease}]");
    }
    json.push(']');
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements_have_the_right_shape() {
        assert_eq!(
            insert_sql(0).as_ref(),
            "INSERT INTO broker_messages (queue, body, headers, visible_at, published_at) VALUES (?, ?, ?, ?, ?)"
        );
        assert_eq!(insert_sql(MAX_INSERT_LOG2).matches('?').count(), 5 * 256);
    }

    #[test]
    fn leases_encode_as_json_pairs() {
        assert_eq!(leases_json([(7, 42), (8, 43)]), "[[7,42],[8,43]]");
        assert_eq!(leases_json([]), "[]");
    }
}
