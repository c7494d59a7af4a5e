//! Records from SQLite rows: the column getters every query uses (times are microseconds,
//! lists and maps JSON) and the registry's records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hookline_core::model::{ApiKey, EventType, Subscription, SubscriptionSecret, Tenant};
use hookline_core::quota::TenantQuotas;
use hookline_core::{Id, IdKind};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;

use crate::StoreError;
use crate::codec::{self, decode_error};
use crate::error::translate;

pub(super) fn get_id(row: &SqliteRow, column: &str, kind: IdKind) -> Result<Id, sqlx::Error> {
    codec::id(column, row.try_get(column)?, kind)
}

/// A time from its microseconds since the Unix epoch.
pub(super) fn from_micros(column: &str, micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| decode_error(column, format!("timestamp {micros} µs is out of range")))
}

/// The microseconds since the Unix epoch that a time is stored as. Like PostgreSQL, finer
/// precision is dropped.
pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn get_time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    from_micros(column, row.try_get(column)?)
}

pub(super) fn get_opt_time(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(column)?
        .map(|v| from_micros(column, v))
        .transpose()
}

/// An INTEGER column that holds a `u32` (counts, limits, attempt numbers).
pub(super) fn get_u32(row: &SqliteRow, column: &str) -> Result<u32, sqlx::Error> {
    codec::u32_of(column, row.try_get(column)?)
}

pub(super) fn get_opt_u32(row: &SqliteRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    codec::opt_u32_of(column, row.try_get(column)?)
}

fn get_map(row: &SqliteRow, column: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let Json(map): Json<BTreeMap<String, String>> = row.try_get(column)?;
    Ok(map)
}

pub(super) fn get_strings(row: &SqliteRow, column: &str) -> Result<Vec<String>, sqlx::Error> {
    let Json(list): Json<Vec<String>> = row.try_get(column)?;
    Ok(list)
}

pub(super) fn tenant_from_row(row: &SqliteRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: get_id(row, "id", IdKind::Tenant)?,
        name: row.try_get("name")?,
        metadata: get_map(row, "metadata")?,
        quotas: quotas_from_row(row)?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

pub(super) fn subscription_from_row(row: &SqliteRow) -> Result<Subscription, sqlx::Error> {
    let state = codec::subscription_state(row.try_get("state")?)?;
    let retry_ms: Option<Json<Vec<i64>>> = row.try_get("retry_schedule_ms")?;
    let retry_schedule = codec::retry_schedule(retry_ms.map(|Json(ms)| ms))?;
    let payload_format = codec::payload_format(row.try_get("payload_format")?)?;
    let ordering = codec::ordering(row.try_get("ordering")?)?;
    Ok(Subscription {
        id: get_id(row, "id", IdKind::Subscription)?,
        tenant_id: get_id(row, "tenant_id", IdKind::Tenant)?,
        url: row.try_get("url")?,
        description: row.try_get("description")?,
        event_types: get_strings(row, "event_types")?,
        channels: get_strings(row, "channels")?,
        headers: get_map(row, "headers")?,
        rate_limit_per_second: get_opt_u32(row, "rate_limit_per_second")?,
        max_in_flight: get_opt_u32(row, "max_in_flight")?,
        retry_schedule,
        state,
        disabled_reason: row.try_get("disabled_reason")?,
        metadata: get_map(row, "metadata")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
        payload_format,
        ordering,
    })
}

pub(super) fn secret_from_row(row: &SqliteRow) -> Result<SubscriptionSecret, sqlx::Error> {
    Ok(SubscriptionSecret {
        id: get_id(row, "id", IdKind::Secret)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        secret: row.try_get("secret")?,
        created_at: get_time(row, "created_at")?,
        expires_at: get_opt_time(row, "expires_at")?,
    })
}

pub(super) fn event_type_from_row(row: &SqliteRow) -> Result<EventType, sqlx::Error> {
    Ok(EventType {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        schema: row.try_get("schema")?,
        archived: row.try_get("archived")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

pub(super) fn api_key_from_row(row: &SqliteRow) -> Result<ApiKey, sqlx::Error> {
    let tenant_id = codec::opt_id("tenant_id", row.try_get("tenant_id")?, IdKind::Tenant)?;
    Ok(ApiKey {
        id: get_id(row, "id", IdKind::ApiKey)?,
        name: row.try_get("name")?,
        tenant_id,
        token_prefix: row.try_get("token_prefix")?,
        created_at: get_time(row, "created_at")?,
        revoked_at: get_opt_time(row, "revoked_at")?,
    })
}

/// Decodes every row with `f`.
pub(super) fn map_rows<T>(
    rows: &[SqliteRow],
    f: fn(&SqliteRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(|r| f(r).map_err(translate)).collect()
}

/// The override columns of a tenant row.
fn quotas_from_row(row: &SqliteRow) -> Result<TenantQuotas, sqlx::Error> {
    Ok(TenantQuotas {
        max_subscriptions: get_opt_u32(row, "max_subscriptions")?,
        max_deliveries_per_event: get_opt_u32(row, "max_deliveries_per_event")?,
        max_events_per_second: get_opt_u32(row, "max_events_per_second")?,
        weight: get_opt_u32(row, "weight")?,
    })
}
