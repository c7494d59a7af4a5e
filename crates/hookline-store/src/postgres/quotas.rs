//! Tenant quotas on PostgreSQL: reading and setting a tenant's overrides, and the check
//! that keeps concurrent `CreateSubscription` calls of one tenant within its quota.

use hookline_core::Id;
use hookline_core::model::Tenant;
use hookline_core::quota::{self, TenantQuotas};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row, Transaction};

use super::rows::{get_opt_u32, tenant_from_row};
use crate::StoreError;
use crate::codec::quota_params;
use crate::error::Db;
use crate::error::found;

pub(super) async fn set(pool: &PgPool, id: &Id, q: &TenantQuotas) -> Result<Tenant, StoreError> {
    let [
        max_subscriptions,
        max_deliveries_per_event,
        max_events_per_second,
        weight,
    ] = quota_params(q)?;
    let row = sqlx::query(concat!(
        "UPDATE tenants SET max_subscriptions = $2, max_deliveries_per_event = $3, \
         max_events_per_second = $4, weight = $5, updated_at = now() WHERE id = $1 RETURNING ",
        tenant_cols!()
    ))
    .bind(id.as_str())
    .bind(max_subscriptions)
    .bind(max_deliveries_per_event)
    .bind(max_events_per_second)
    .bind(weight)
    .fetch_optional(pool)
    .await
    .db()?;
    tenant_from_row(&found(row, "tenant", id)?).db()
}

/// Inside the transaction that inserts a subscription: locks the tenant row (so creates of
/// one tenant take turns; `NO KEY UPDATE` leaves foreign-key checks of publishes alone),
/// then counts its subscriptions in a statement of its own, whose snapshot is taken after
/// the lock and so sees every create that went before.
pub(super) async fn check_subscriptions(
    tx: &mut Transaction<'_, Postgres>,
    tenant_id: &Id,
    default_limit: u32,
) -> Result<(), StoreError> {
    let row = sqlx::query("SELECT max_subscriptions FROM tenants WHERE id = $1 FOR NO KEY UPDATE")
        .bind(tenant_id.as_str())
        .fetch_optional(&mut **tx)
        .await
        .db()?;
    let row = found(row, "tenant", tenant_id)?;
    let limit = get_opt_u32(&row, "max_subscriptions")
        .db()?
        .unwrap_or(default_limit);
    let count: i64 = sqlx::query("SELECT count(*) FROM subscriptions WHERE tenant_id = $1")
        .bind(tenant_id.as_str())
        .fetch_one(&mut **tx)
        .await
        .and_then(|row| row.try_get(0))
        .db()?;
    Ok(quota::check_subscriptions(tenant_id, count, limit)?)
}
