//! Ordered delivery on PostgreSQL: the SQL behind [`crate::ordered`].
//!
//! A publish upserts its subscription's `ordered_heads` row (`ON CONFLICT DO UPDATE … WHERE
//! false`), which locks the row even when it does not become the head. An outcome ending a
//! head deletes that row first (waiting for such a publish to commit) and only then, in a
//! new statement and so a new snapshot, looks for the next waiting delivery. The row lock
//! orders the two: a delivery committed as waiting is either seen by the promotion or finds
//! no head and becomes the head itself, so none is left waiting with no head.

use hookline_core::Id;
use hookline_core::job::DeliveryJob;
use hookline_core::model::DeliveryStatus;
use sqlx::postgres::{PgPool, Postgres};
use sqlx::{Row, Transaction};

use super::events::job_from_row;
use super::rows::map_rows;
use crate::StoreError;
use crate::codec;
use crate::error::Db;

/// Ends the heads among `$1` (finished deliveries), returning their subscriptions. The
/// rows are locked in subscription order first, the order a publish's upsert takes them
/// in, so a batch ending several heads cannot deadlock with a publish to the same ones.
const END_HEADS: &str = "\
WITH locked AS (
    SELECT subscription_id FROM ordered_heads WHERE delivery_id = ANY($1)
    ORDER BY subscription_id
    FOR UPDATE
)
DELETE FROM ordered_heads h USING locked l
WHERE h.subscription_id = l.subscription_id AND h.delivery_id = ANY($1)
RETURNING h.subscription_id";

/// Promotes the lowest waiting delivery of each subscription of `$1` to head: its head row
/// and its outbox row; returns its job.
const PROMOTE_NEXT: &str = concat!(
    "WITH next AS ( \
        SELECT DISTINCT ON (subscription_id) subscription_id, id FROM deliveries \
        WHERE subscription_id = ANY($1) AND seq IS NOT NULL AND status = 'pending' \
        ORDER BY subscription_id, seq), \
     heads AS ( \
        INSERT INTO ordered_heads (subscription_id, delivery_id) \
        SELECT subscription_id, id FROM next \
        ON CONFLICT (subscription_id) DO NOTHING \
        RETURNING delivery_id), \
     queued AS ( \
        INSERT INTO delivery_outbox (delivery_id) SELECT delivery_id FROM heads \
        ON CONFLICT (delivery_id) DO NOTHING) \
     SELECT ",
    job_cols!(),
    ", e.payload FROM heads h JOIN deliveries d ON d.id = h.delivery_id \
        JOIN events e ON e.id = d.event_id \
     ORDER BY d.subscription_id"
);

/// Takes the subscription `$1` out of the order: its head row goes and every delivery still
/// in its queue loses its place (`seq`); the waiting ones go to the outbox (run after
/// [`END_ALL`] in the same transaction, so a publish holding the head row has committed).
const RELEASE: &str = "\
WITH released AS (
    UPDATE deliveries SET seq = NULL
    WHERE subscription_id = $1 AND seq IS NOT NULL AND (status = 'pending' OR id = $2)
    RETURNING id
)
INSERT INTO delivery_outbox (delivery_id)
SELECT id FROM released WHERE id IS DISTINCT FROM $2
ON CONFLICT (delivery_id) DO NOTHING";

/// Deletes the head row of subscription `$1`, returning the head delivery.
const END_ALL: &str = "DELETE FROM ordered_heads WHERE subscription_id = $1 RETURNING delivery_id";

/// Ends the heads among `finished` and promotes the next delivery of each of their
/// subscriptions; returns the promoted jobs, to publish once the transaction commits.
pub(super) async fn advance(
    tx: &mut Transaction<'_, Postgres>,
    finished: &[&str],
) -> Result<Vec<DeliveryJob>, StoreError> {
    if finished.is_empty() {
        return Ok(Vec::new());
    }
    let subscriptions: Vec<String> = sqlx::query_scalar(END_HEADS)
        .bind(finished)
        .fetch_all(&mut **tx)
        .await
        .db()?;
    if subscriptions.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(PROMOTE_NEXT)
        .persistent(false)
        .bind(&subscriptions)
        .fetch_all(&mut **tx)
        .await
        .db()?;
    map_rows(&rows, job_from_row)
}

/// Releases every delivery of the subscription from the order (it became unordered or was
/// disabled): the waiting ones go to the outbox, for the relay to publish.
pub(super) async fn release(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: &Id,
) -> Result<(), StoreError> {
    let head: Option<String> = sqlx::query_scalar(END_ALL)
        .bind(subscription_id.as_str())
        .fetch_optional(&mut **tx)
        .await
        .db()?;
    sqlx::query(RELEASE)
        .bind(subscription_id.as_str())
        .bind(head)
        .execute(&mut **tx)
        .await
        .db()?;
    Ok(())
}

/// Whether the delivery's job may be attempted now (see [`crate::ordered::may_attempt`]).
pub(super) async fn may_attempt(pool: &PgPool, delivery_id: &Id) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT d.status, d.seq IS NOT NULL AS ordered, \
             EXISTS (SELECT 1 FROM ordered_heads h WHERE h.delivery_id = d.id) AS head \
         FROM deliveries d WHERE d.id = $1",
    )
    .bind(delivery_id.as_str())
    .fetch_optional(pool)
    .await
    .db()?;
    let Some(row) = row else {
        return Ok(crate::ordered::may_attempt(None, false, false));
    };
    let status: DeliveryStatus = codec::delivery_status(row.try_get("status").db()?).db()?;
    let ordered: bool = row.try_get("ordered").db()?;
    let head: bool = row.try_get("head").db()?;
    Ok(crate::ordered::may_attempt(Some(status), ordered, head))
}
