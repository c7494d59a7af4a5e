//! Ordered delivery on SQLite: the SQL behind [`crate::ordered`]. Every write holds the one
//! writer lock (`BEGIN IMMEDIATE`), so insertion order is publish order and a head and its
//! successor cannot be decided by two writers at once.

use hookline_core::Id;
use hookline_core::job::DeliveryJob;
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

use super::events::{QUEUE_IDS, jobs_in_order};
use super::heads::set_heads;
use super::id_array;
use crate::StoreError;
use crate::codec;
use crate::error::Db;

/// Ends the heads among `finished` and promotes the next delivery of each of their
/// subscriptions (head and outbox row, stamped `now`); returns the promoted jobs.
pub(super) async fn advance(
    tx: &mut Transaction<'_, Sqlite>,
    finished: &[&str],
    now: i64,
) -> Result<Vec<DeliveryJob>, StoreError> {
    if finished.is_empty() {
        return Ok(Vec::new());
    }
    let subscriptions: Vec<String> = sqlx::query_scalar(
        "DELETE FROM ordered_heads WHERE delivery_id IN (SELECT value FROM json_each(?1)) \
         RETURNING subscription_id",
    )
    .bind(id_array(finished.iter().copied()))
    .fetch_all(&mut **tx)
    .await
    .db()?;
    let mut next = Vec::new();
    for s in &subscriptions {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM deliveries WHERE subscription_id = ?1 AND seq IS NOT NULL \
             AND status = 'pending' ORDER BY seq LIMIT 1",
        )
        .bind(s.as_str())
        .fetch_optional(&mut **tx)
        .await
        .db()?;
        if let Some(id) = id {
            next.push((id, s.clone()));
        }
    }
    let heads: Vec<(&str, &str)> = next.iter().map(|(d, s)| (d.as_str(), s.as_str())).collect();
    set_heads(tx, &heads).await?;
    let ids: Vec<&str> = heads.iter().map(|(d, _)| *d).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(QUEUE_IDS)
        .bind(id_array(ids.iter().copied()))
        .bind(now)
        .execute(&mut **tx)
        .await
        .db()?;
    jobs_in_order(tx, &ids).await
}

/// Releases every delivery of the subscription from the order (it became unordered or was
/// disabled): the waiting ones go to the outbox (stamped `now`), for the relay to publish.
pub(super) async fn release(
    tx: &mut Transaction<'_, Sqlite>,
    subscription_id: &Id,
    now: i64,
) -> Result<(), StoreError> {
    let head: Option<String> = sqlx::query_scalar(
        "DELETE FROM ordered_heads WHERE subscription_id = ?1 RETURNING delivery_id",
    )
    .bind(subscription_id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .db()?;
    let released: Vec<String> = sqlx::query_scalar(
        "UPDATE deliveries SET seq = NULL \
         WHERE subscription_id = ?1 AND seq IS NOT NULL AND (status = 'pending' OR id = ?2) \
         RETURNING id",
    )
    .bind(subscription_id.as_str())
    .bind(head.as_deref())
    .fetch_all(&mut **tx)
    .await
    .db()?;
    let waiting = released
        .iter()
        .map(String::as_str)
        .filter(|id| Some(*id) != head.as_deref());
    sqlx::query(QUEUE_IDS)
        .bind(id_array(waiting))
        .bind(now)
        .execute(&mut **tx)
        .await
        .db()?;
    Ok(())
}

/// Whether the delivery's job may be attempted now (see [`crate::ordered::may_attempt`]).
pub(super) async fn may_attempt(reader: &SqlitePool, delivery_id: &Id) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT d.status, d.seq IS NOT NULL AS ordered, \
             EXISTS (SELECT 1 FROM ordered_heads h WHERE h.delivery_id = d.id) AS head \
         FROM deliveries d WHERE d.id = ?1",
    )
    .bind(delivery_id.as_str())
    .fetch_optional(reader)
    .await
    .db()?;
    let Some(row) = row else {
        return Ok(crate::ordered::may_attempt(None, false, false));
    };
    let status = codec::delivery_status(row.try_get("status").db()?).db()?;
    let ordered: bool = row.try_get("ordered").db()?;
    let head: bool = row.try_get("head").db()?;
    Ok(crate::ordered::may_attempt(Some(status), ordered, head))
}
