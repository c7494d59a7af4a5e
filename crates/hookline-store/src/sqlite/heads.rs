//! The head rows and sequence numbers of ordered subscriptions on SQLite, as a publish
//! sets them (`events`) and the end of a head moves them (`ordered`).

use std::collections::HashSet;

use sqlx::sqlite::SqliteConnection;

use super::id_array;
use crate::StoreError;
use crate::error::Db;

/// The highest `seq` given so far (0 for none).
pub(super) async fn last_seq(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM deliveries WHERE seq IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .db()
}

/// Which of `subscriptions` have a head already.
pub(super) async fn with_head(
    conn: &mut SqliteConnection,
    subscriptions: &[&str],
) -> Result<HashSet<String>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT subscription_id FROM ordered_heads \
         WHERE subscription_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(id_array(subscriptions.iter().copied()))
    .fetch_all(&mut *conn)
    .await
    .db()?;
    Ok(ids.into_iter().collect())
}

/// Makes each `(delivery, subscription)` its subscription's head.
pub(super) async fn set_heads(
    conn: &mut SqliteConnection,
    heads: &[(&str, &str)],
) -> Result<(), StoreError> {
    for (delivery, subscription) in heads {
        sqlx::query("INSERT INTO ordered_heads (subscription_id, delivery_id) VALUES (?1, ?2)")
            .bind(*subscription)
            .bind(*delivery)
            .execute(&mut *conn)
            .await
            .db()?;
    }
    Ok(())
}
