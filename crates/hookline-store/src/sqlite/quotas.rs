//! Tenant quotas on SQLite: reading and setting a tenant's overrides, and the check that
//! keeps concurrent `CreateSubscription` calls of one tenant within its quota (the write
//! transaction is exclusive, so a count taken in it holds until the commit).

use hookline_core::Id;
use hookline_core::model::Tenant;
use hookline_core::quota::{self, TenantQuotas};
use sqlx::{Row, Sqlite, Transaction};

use super::rows::{get_opt_u32, tenant_from_row};
use crate::StoreError;
use crate::codec::quota_params;
use crate::error::Db;
use crate::error::found;

/// Replaces the overrides inside a write transaction stamped `now`.
pub(super) async fn set(
    tx: &mut Transaction<'static, Sqlite>,
    now: i64,
    id: &Id,
    q: &TenantQuotas,
) -> Result<Tenant, StoreError> {
    let [
        max_subscriptions,
        max_deliveries_per_event,
        max_events_per_second,
        weight,
    ] = quota_params(q)?;
    let row = sqlx::query(concat!(
        "UPDATE tenants SET max_subscriptions = ?2, max_deliveries_per_event = ?3, \
         max_events_per_second = ?4, weight = ?6, updated_at = ?5 WHERE id = ?1 RETURNING ",
        tenant_cols!()
    ))
    .bind(id.as_str())
    .bind(max_subscriptions)
    .bind(max_deliveries_per_event)
    .bind(max_events_per_second)
    .bind(now)
    .bind(weight)
    .fetch_optional(&mut **tx)
    .await
    .db()?;
    tenant_from_row(&found(row, "tenant", id)?).db()
}

/// Inside the (exclusive) transaction that inserts a subscription: refuses it when the
/// tenant has as many as its quota already.
pub(super) async fn check_subscriptions(
    tx: &mut Transaction<'static, Sqlite>,
    tenant_id: &Id,
    default_limit: u32,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "SELECT max_subscriptions, \
         (SELECT count(*) FROM subscriptions WHERE tenant_id = ?1) AS n \
         FROM tenants WHERE id = ?1",
    )
    .bind(tenant_id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .db()?;
    let row = found(row, "tenant", tenant_id)?;
    let limit = get_opt_u32(&row, "max_subscriptions")
        .db()?
        .unwrap_or(default_limit);
    let count: i64 = row.try_get("n").db()?;
    Ok(quota::check_subscriptions(tenant_id, count, limit)?)
}
