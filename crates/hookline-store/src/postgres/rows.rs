//! Records from PostgreSQL rows: the column getters every query uses and the registry's
//! records (events and deliveries decode theirs beside their queries).

use std::collections::BTreeMap;

use hookline_core::model::{ApiKey, EventType, Subscription, SubscriptionSecret, Tenant};
use hookline_core::quota::TenantQuotas;
use hookline_core::{Id, IdKind};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

use crate::StoreError;
use crate::codec;
use crate::error::translate;

pub(super) fn get_id(row: &PgRow, column: &str, kind: IdKind) -> Result<Id, sqlx::Error> {
    codec::id(column, row.try_get(column)?, kind)
}

pub(super) fn get_opt_u32(row: &PgRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    codec::opt_u32_of(
        column,
        row.try_get::<Option<i32>, _>(column)?.map(i64::from),
    )
}

/// An `integer` column that holds a `u32` (counts, attempt numbers).
pub(super) fn get_u32(row: &PgRow, column: &str) -> Result<u32, sqlx::Error> {
    codec::u32_of(column, row.try_get::<i32, _>(column)?.into())
}

fn get_map(row: &PgRow, column: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let Json(map): Json<BTreeMap<String, String>> = row.try_get(column)?;
    Ok(map)
}

pub(super) fn tenant_from_row(row: &PgRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: get_id(row, "id", IdKind::Tenant)?,
        name: row.try_get("name")?,
        metadata: get_map(row, "metadata")?,
        quotas: quotas_from_row(row)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(super) fn subscription_from_row(row: &PgRow) -> Result<Subscription, sqlx::Error> {
    let state = codec::subscription_state(row.try_get("state")?)?;
    let retry_schedule = codec::retry_schedule(row.try_get("retry_schedule_ms")?)?;
    let payload_format = codec::payload_format(row.try_get("payload_format")?)?;
    let ordering = codec::ordering(row.try_get("ordering")?)?;
    Ok(Subscription {
        id: get_id(row, "id", IdKind::Subscription)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        url: row.try_get("url")?,
        description: row.try_get("description")?,
        event_types: row.try_get("event_types")?,
        channels: row.try_get("channels")?,
        headers: get_map(row, "headers")?,
        rate_limit_per_second: get_opt_u32(row, "rate_limit_per_second")?,
        max_in_flight: get_opt_u32(row, "max_in_flight")?,
        retry_schedule,
        state,
        disabled_reason: row.try_get("disabled_reason")?,
        metadata: get_map(row, "metadata")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        payload_format,
        ordering,
    })
}

pub(super) fn secret_from_row(row: &PgRow) -> Result<SubscriptionSecret, sqlx::Error> {
    Ok(SubscriptionSecret {
        id: get_id(row, "id", IdKind::Secret)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        secret: row.try_get("secret")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

pub(super) fn event_type_from_row(row: &PgRow) -> Result<EventType, sqlx::Error> {
    Ok(EventType {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        schema: row.try_get("schema")?,
        archived: row.try_get("archived")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(super) fn api_key_from_row(row: &PgRow) -> Result<ApiKey, sqlx::Error> {
    let tenant_id = codec::opt_id("tenant_id", row.try_get("tenant_id")?, IdKind::Tenant)?;
    Ok(ApiKey {
        id: get_id(row, "id", IdKind::ApiKey)?,
        name: row.try_get("name")?,
        tenant_id,
        token_prefix: row.try_get("token_prefix")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Decodes every row with `f`.
pub(super) fn map_rows<T>(
    rows: &[PgRow],
    f: fn(&PgRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(|r| f(r).map_err(translate)).collect()
}

/// The override columns of a tenant row.
fn quotas_from_row(row: &PgRow) -> Result<TenantQuotas, sqlx::Error> {
    Ok(TenantQuotas {
        max_subscriptions: get_opt_u32(row, "max_subscriptions")?,
        max_deliveries_per_event: get_opt_u32(row, "max_deliveries_per_event")?,
        max_events_per_second: get_opt_u32(row, "max_events_per_second")?,
        weight: get_opt_u32(row, "weight")?,
    })
}
