//! The PostgreSQL adapter of the storage port, for clusters.
//!
//! Every service of a cluster shares one PostgreSQL database as its source of truth. This
//! module owns the schema (the embedded migrations in `migrations/postgres`) and implements
//! the port's traits with plain `sqlx::query` calls, so the crate builds without a database.
//! The control plane ([`RegistryStore`]) lives here; the data plane, where throughput matters,
//! in `events` ([`crate::port::EventStore`]: ingest and the outbox) and `deliveries`
//! ([`crate::port::DeliveryStore`]: attempts, the retry schedule, manual retries).
//!
//! Conventions of the mapping:
//! * ids are stored as their text form (`ten_01J…`, collation "C") and parsed back with their
//!   kind, so a corrupt row is reported instead of producing a wrong-kind id;
//! * pagination is keyset: the cursor is the last id (or event-type name) of the page, and a
//!   page asks for one row more than it returns to know whether another page follows;
//! * `BTreeMap<String, String>` is a jsonb object, `Vec<Duration>` a `bigint[]` of
//!   milliseconds, `u32` an `integer`;
//! * violated constraints become [`StoreError::Conflict`] (unique) or
//!   [`StoreError::NotFound`] (a foreign key to something that is not there).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::model::{
    ApiKey, EventType, Subscription, SubscriptionSecret, SubscriptionState, Tenant,
};
use hookline_core::quota::TenantQuotas;
use hookline_core::{Id, IdKind};
use sqlx::error::ErrorKind;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};

use crate::StoreError;
use crate::port::{NewApiKey, NewSubscription, Page, PageRequest, RegistryStore, StoreHealth};

/// The schema, embedded at build time from `migrations/postgres`.
///
/// The workspace leaves sqlx's `macros` feature off (no compile-time checked queries, so no
/// database at build time); that feature only gates the `sqlx::migrate!` wrapper, so the
/// proc macro it forwards to is called directly. It reads files, never a database.
pub static MIGRATOR: Migrator = sqlx::sqlx_macros::migrate!("./migrations/postgres");

/// Page length when a request asks for 0.
pub const DEFAULT_PAGE_LIMIT: u32 = 50;
/// The longest page a request may ask for; longer requests are clamped.
pub const MAX_PAGE_LIMIT: u32 = 1000;

/// The storage port on PostgreSQL. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Opens a pool of at most `max_connections` (at least 1) connections to `url`.
    ///
    /// Connections are opened lazily but one is opened here, so a wrong URL or an
    /// unreachable server fails now rather than on the first request.
    ///
    /// Sessions run with `client_min_messages=warning`: PostgreSQL's NOTICEs (such as
    /// "relation _sqlx_migrations already exists, skipping" on every start) are routine
    /// and would otherwise be logged at INFO by sqlx.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = url
            .parse::<sqlx::postgres::PgConnectOptions>()?
            .options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool (shared with other adapters of the same process).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Applies the pending migrations. Safe to run concurrently from several processes
    /// (sqlx serialises them with an advisory lock) and again on an up-to-date database.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(e.into()))
    }

    /// The underlying pool, for adapters of other ports that share it.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool and waits for its connections to be returned and closed.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Column lists, shared by every query that returns a record (kept as macros so that the SQL
// strings stay `&'static str`).
// ---------------------------------------------------------------------------------------------

macro_rules! tenant_cols {
    () => {
        "id, name, metadata, max_subscriptions, max_deliveries_per_event, \
         max_events_per_second, created_at, updated_at"
    };
}

macro_rules! subscription_cols {
    () => {
        "id, tenant_id, url, description, event_types, channels, headers, \
         rate_limit_per_second, max_in_flight, retry_schedule_ms, state, disabled_reason, \
         metadata, created_at, updated_at, payload_format"
    };
}

macro_rules! secret_cols {
    () => {
        "id, subscription_id, secret, created_at, expires_at"
    };
}

macro_rules! event_type_cols {
    () => {
        "name, description, schema::text AS schema, archived, created_at, updated_at"
    };
}

macro_rules! api_key_cols {
    () => {
        "id, name, tenant_id, token_prefix, created_at, revoked_at"
    };
}

macro_rules! event_cols {
    () => {
        "id, tenant_id, event_type, payload, channels, idempotency_key, created_at"
    };
}

macro_rules! delivery_cols {
    () => {
        "id, event_id, tenant_id, subscription_id, event_type, status, attempt_count, \
         next_attempt_at, last_attempt_at, last_status_code, last_error, created_at, updated_at, \
         deferred_reason"
    };
}

macro_rules! attempt_cols {
    () => {
        "id, delivery_id, attempt_number, started_at, duration_ms, status_code, error_class, \
         error_message, response_excerpt"
    };
}

/// What a delivery job needs from a delivery row `d` (the payload comes from its event).
macro_rules! job_cols {
    () => {
        "d.id, d.event_id, d.tenant_id, d.subscription_id, d.event_type, d.attempt_count, \
         d.traceparent"
    };
}

// The data plane's modules come after the column lists so that they can use them.
mod deliveries;
mod events;
mod quotas;
mod sealing;

// ---------------------------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------------------------

fn decode_error(column: &str, message: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: message.into(),
    }
}

fn get_id(row: &PgRow, column: &str, kind: IdKind) -> Result<Id, sqlx::Error> {
    let raw: String = row.try_get(column)?;
    Id::parse(kind, column, &raw).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: Box::new(e),
    })
}

fn get_opt_u32(row: &PgRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    let raw: Option<i32> = row.try_get(column)?;
    raw.map(|v| u32::try_from(v).map_err(|_| decode_error(column, format!("negative value {v}"))))
        .transpose()
}

fn get_map(row: &PgRow, column: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let Json(map): Json<BTreeMap<String, String>> = row.try_get(column)?;
    Ok(map)
}

fn tenant_from_row(row: &PgRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: get_id(row, "id", IdKind::Tenant)?,
        name: row.try_get("name")?,
        metadata: get_map(row, "metadata")?,
        quotas: quotas::quotas_from_row(row)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn subscription_from_row(row: &PgRow) -> Result<Subscription, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let state = SubscriptionState::parse(&state)
        .ok_or_else(|| decode_error("state", format!("unknown subscription state {state:?}")))?;
    let retry_ms: Option<Vec<i64>> = row.try_get("retry_schedule_ms")?;
    let retry_schedule = retry_ms
        .map(|ms| {
            ms.into_iter()
                .map(|v| {
                    u64::try_from(v).map(Duration::from_millis).map_err(|_| {
                        decode_error("retry_schedule_ms", format!("negative delay {v} ms"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let format: String = row.try_get("payload_format")?;
    let payload_format = format
        .parse()
        .map_err(|e| decode_error("payload_format", e))?;
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
    })
}

fn secret_from_row(row: &PgRow) -> Result<SubscriptionSecret, sqlx::Error> {
    Ok(SubscriptionSecret {
        id: get_id(row, "id", IdKind::Secret)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        secret: row.try_get("secret")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

fn event_type_from_row(row: &PgRow) -> Result<EventType, sqlx::Error> {
    Ok(EventType {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        schema: row.try_get("schema")?,
        archived: row.try_get("archived")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn api_key_from_row(row: &PgRow) -> Result<ApiKey, sqlx::Error> {
    let tenant_id = row
        .try_get::<Option<String>, _>("tenant_id")?
        .map(|raw| {
            Id::parse(IdKind::Tenant, "tenant_id", &raw).map_err(|e| sqlx::Error::ColumnDecode {
                index: "tenant_id".to_string(),
                source: Box::new(e),
            })
        })
        .transpose()?;
    Ok(ApiKey {
        id: get_id(row, "id", IdKind::ApiKey)?,
        name: row.try_get("name")?,
        tenant_id,
        token_prefix: row.try_get("token_prefix")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn map_rows<T>(
    rows: &[PgRow],
    f: fn(&PgRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter()
        .map(|r| f(r).map_err(StoreError::from))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Parameter encoding
// ---------------------------------------------------------------------------------------------

fn encode_error(message: String) -> StoreError {
    StoreError::Database(sqlx::Error::Encode(message.into()))
}

fn opt_u32_param(field: &str, value: Option<u32>) -> Result<Option<i32>, StoreError> {
    value
        .map(|v| {
            i32::try_from(v).map_err(|_| {
                encode_error(format!(
                    "{field} is {v}; the largest value that can be stored is {}",
                    i32::MAX
                ))
            })
        })
        .transpose()
}

fn retry_schedule_param(schedule: Option<&[Duration]>) -> Result<Option<Vec<i64>>, StoreError> {
    schedule
        .map(|delays| {
            delays
                .iter()
                .map(|d| {
                    i64::try_from(d.as_millis()).map_err(|_| {
                        encode_error(format!(
                            "retry delay of {} s is too long to be stored",
                            d.as_secs()
                        ))
                    })
                })
                .collect()
        })
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Pagination
// ---------------------------------------------------------------------------------------------

/// The page length a request gets: 0 means the default, longer than the maximum is clamped.
pub fn effective_limit(page: &PageRequest) -> u32 {
    match page.limit {
        0 => DEFAULT_PAGE_LIMIT,
        n => n.min(MAX_PAGE_LIMIT),
    }
}

/// The lower bound of a keyset page. Every id and name is non-empty and compares greater
/// than "" under collation "C", so the first page needs no separate query.
fn cursor(page: &PageRequest) -> &str {
    page.after.as_deref().unwrap_or("")
}

/// Builds a page from `limit + 1` fetched rows: the extra row only says another page follows.
fn into_page<T>(mut items: Vec<T>, limit: u32, key: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next_cursor }
}

// ---------------------------------------------------------------------------------------------
// Error mapping
// ---------------------------------------------------------------------------------------------

/// A violated constraint, by kind and name.
enum Violation<'a> {
    Unique(&'a str),
    ForeignKey(&'a str),
}

fn violation(err: &sqlx::Error) -> Option<Violation<'_>> {
    let db = err.as_database_error()?;
    let constraint = db.constraint().unwrap_or("");
    match db.kind() {
        ErrorKind::UniqueViolation => Some(Violation::Unique(constraint)),
        ErrorKind::ForeignKeyViolation => Some(Violation::ForeignKey(constraint)),
        _ => None,
    }
}

/// Turns a violated constraint into the error `f` names for it, or keeps the database error.
fn map_violation(
    err: sqlx::Error,
    f: impl FnOnce(Violation<'_>) -> Option<StoreError>,
) -> StoreError {
    let mapped = violation(&err).and_then(f);
    mapped.unwrap_or(StoreError::Database(err))
}

/// The value PostgreSQL names in a violation's detail (`Key (tenant_id)=(ten_…) is not
/// present in table "tenants".`), to say which of a batch's records was at fault.
fn violating_value(err: &sqlx::Error) -> Option<String> {
    let detail = err
        .as_database_error()?
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?
        .detail()?;
    let start = detail.find(")=(")? + 3;
    let len = detail[start..].find(')')?;
    Some(detail[start..start + len].to_string())
}

fn not_found(entity: &'static str, id: impl ToString) -> StoreError {
    StoreError::NotFound {
        entity,
        id: id.to_string(),
    }
}

/// `Ok(row)` or NotFound when the query returned nothing.
fn found<T>(row: Option<T>, entity: &'static str, id: impl ToString) -> Result<T, StoreError> {
    row.ok_or_else(|| not_found(entity, id))
}

// ---------------------------------------------------------------------------------------------
// The port
// ---------------------------------------------------------------------------------------------

#[async_trait]
impl RegistryStore for PgStore {
    async fn create_tenant(
        &self,
        id: &Id,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "INSERT INTO tenants (id, name, metadata) VALUES ($1, $2, $3) RETURNING ",
            tenant_cols!()
        ))
        .bind(id.as_str())
        .bind(name)
        .bind(Json(metadata))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "tenant {id} already exists; choose another id"
                ))),
                Violation::ForeignKey(_) => None,
            })
        })?;
        Ok(tenant_from_row(&row)?)
    }

    async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenants WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(tenant_from_row(&found(row, "tenant", id)?)?)
    }

    async fn list_tenants(&self, page: &PageRequest) -> Result<Page<Tenant>, StoreError> {
        let limit = effective_limit(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenants WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(cursor(page))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = map_rows(&rows, tenant_from_row)?;
        Ok(into_page(items, limit, |t| t.id.to_string()))
    }

    async fn update_tenant(
        &self,
        id: &Id,
        name: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE tenants SET name = COALESCE($2, name), metadata = COALESCE($3, metadata), \
             updated_at = now() WHERE id = $1 RETURNING ",
            tenant_cols!()
        ))
        .bind(id.as_str())
        .bind(name)
        .bind(metadata.map(Json))
        .fetch_optional(&self.pool)
        .await?;
        Ok(tenant_from_row(&found(row, "tenant", id)?)?)
    }

    async fn delete_tenant(&self, id: &Id) -> Result<(), StoreError> {
        // Foreign keys cascade to API keys, subscriptions (and their secrets), events and
        // everything downstream of them.
        let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("tenant", id));
        }
        Ok(())
    }

    async fn set_tenant_quotas(
        &self,
        id: &Id,
        quotas: &TenantQuotas,
    ) -> Result<Tenant, StoreError> {
        quotas::set(&self.pool, id, quotas).await
    }

    async fn create_subscription_within(
        &self,
        new: &NewSubscription,
        default_limit: u32,
    ) -> Result<Subscription, StoreError> {
        let rate_limit = opt_u32_param("rate_limit_per_second", new.rate_limit_per_second)?;
        let max_in_flight = opt_u32_param("max_in_flight", new.max_in_flight)?;
        let retry = retry_schedule_param(new.retry_schedule.as_deref())?;

        let mut tx = self.pool.begin().await?;
        quotas::check_subscriptions(&mut tx, &new.tenant_id, default_limit).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO subscriptions (id, tenant_id, url, description, event_types, channels, \
             headers, rate_limit_per_second, max_in_flight, retry_schedule_ms, state, \
             disabled_reason, metadata, payload_format) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING ",
            subscription_cols!()
        ))
        .bind(new.id.as_str())
        .bind(new.tenant_id.as_str())
        .bind(&new.url)
        .bind(&new.description)
        .bind(&new.event_types)
        .bind(&new.channels)
        .bind(Json(&new.headers))
        .bind(rate_limit)
        .bind(max_in_flight)
        .bind(retry)
        .bind(new.state.as_str())
        // A new subscription has no reason to be disabled yet (`NewSubscription` carries none).
        .bind(None::<&str>)
        .bind(Json(&new.metadata))
        .bind(new.payload_format.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "subscription {} already exists; choose another id",
                    new.id
                ))),
                Violation::ForeignKey(_) => Some(not_found("tenant", &new.tenant_id)),
            })
        })?;
        let subscription = subscription_from_row(&row)?;
        // The secret belongs to the subscription being created, whatever its
        // `subscription_id` field says.
        insert_secret(&mut tx, &new.id, &new.secret).await?;
        tx.commit().await?;
        Ok(subscription)
    }

    async fn get_subscription(&self, id: &Id) -> Result<Subscription, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(subscription_from_row(&found(row, "subscription", id)?)?)
    }

    async fn list_subscriptions(
        &self,
        tenant_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Subscription>, StoreError> {
        let limit = effective_limit(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(tenant_id.as_str())
        .bind(cursor(page))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = map_rows(&rows, subscription_from_row)?;
        Ok(into_page(items, limit, |s| s.id.to_string()))
    }

    async fn update_subscription(&self, sub: &Subscription) -> Result<Subscription, StoreError> {
        let rate_limit = opt_u32_param("rate_limit_per_second", sub.rate_limit_per_second)?;
        let max_in_flight = opt_u32_param("max_in_flight", sub.max_in_flight)?;
        let retry = retry_schedule_param(sub.retry_schedule.as_deref())?;
        let row = sqlx::query(concat!(
            "UPDATE subscriptions SET url = $2, description = $3, event_types = $4, \
             channels = $5, headers = $6, rate_limit_per_second = $7, max_in_flight = $8, \
             retry_schedule_ms = $9, state = $10, disabled_reason = $11, metadata = $12, \
             payload_format = $13, updated_at = now() WHERE id = $1 RETURNING ",
            subscription_cols!()
        ))
        .bind(sub.id.as_str())
        .bind(&sub.url)
        .bind(&sub.description)
        .bind(&sub.event_types)
        .bind(&sub.channels)
        .bind(Json(&sub.headers))
        .bind(rate_limit)
        .bind(max_in_flight)
        .bind(retry)
        .bind(sub.state.as_str())
        .bind(sub.disabled_reason.as_deref())
        .bind(Json(&sub.metadata))
        .bind(sub.payload_format.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(subscription_from_row(&found(
            row,
            "subscription",
            &sub.id,
        )?)?)
    }

    async fn delete_subscription(&self, id: &Id) -> Result<(), StoreError> {
        // Cascades to its secrets and deliveries (and their attempts and schedule).
        let done = sqlx::query("DELETE FROM subscriptions WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("subscription", id));
        }
        Ok(())
    }

    async fn set_subscription_state(
        &self,
        id: &Id,
        state: SubscriptionState,
        reason: Option<&str>,
    ) -> Result<Subscription, StoreError> {
        // An enabled subscription has no reason to be disabled.
        let reason = match state {
            SubscriptionState::Enabled => None,
            SubscriptionState::Disabled => reason,
        };
        let row = sqlx::query(concat!(
            "UPDATE subscriptions SET state = $2, disabled_reason = $3, updated_at = now() \
             WHERE id = $1 RETURNING ",
            subscription_cols!()
        ))
        .bind(id.as_str())
        .bind(state.as_str())
        .bind(reason)
        .fetch_optional(&self.pool)
        .await?;
        Ok(subscription_from_row(&found(row, "subscription", id)?)?)
    }

    async fn enabled_subscriptions(&self, tenant_id: &Id) -> Result<Vec<Subscription>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE tenant_id = $1 AND state = 'enabled' ORDER BY id"
        ))
        .bind(tenant_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        map_rows(&rows, subscription_from_row)
    }

    async fn live_secrets(
        &self,
        subscription_id: &Id,
        now: DateTime<Utc>,
    ) -> Result<Vec<SubscriptionSecret>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            secret_cols!(),
            " FROM subscription_secrets \
             WHERE subscription_id = $1 AND (expires_at IS NULL OR expires_at > $2) \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(subscription_id.as_str())
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            // A subscription always has a current secret, so nothing live means no
            // subscription; check, to tell the caller which.
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE id = $1)")
                    .bind(subscription_id.as_str())
                    .fetch_one(&self.pool)
                    .await?;
            if !exists {
                return Err(not_found("subscription", subscription_id));
            }
        }
        map_rows(&rows, secret_from_row)
    }

    async fn rotate_secret(
        &self,
        new: &SubscriptionSecret,
        old_expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sub_id = new.subscription_id.as_str();
        let mut tx = self.pool.begin().await?;
        // Touching the subscription row checks it exists and serialises concurrent rotations
        // of it (a no-key-update lock: deliveries referencing it can still be inserted).
        let touched = sqlx::query("UPDATE subscriptions SET updated_at = now() WHERE id = $1")
            .bind(sub_id)
            .execute(&mut *tx)
            .await?;
        if touched.rows_affected() == 0 {
            return Err(not_found("subscription", &new.subscription_id));
        }
        // Secrets already past their expiry are of no use to anyone.
        sqlx::query(
            "DELETE FROM subscription_secrets \
             WHERE subscription_id = $1 AND expires_at IS NOT NULL AND expires_at <= now()",
        )
        .bind(sub_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE subscription_secrets SET expires_at = $2 \
             WHERE subscription_id = $1 AND expires_at IS NULL",
        )
        .bind(sub_id)
        .bind(old_expires_at)
        .execute(&mut *tx)
        .await?;
        insert_secret(&mut tx, &new.subscription_id, new).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_event_type(
        &self,
        name: &str,
        description: &str,
        schema: Option<&str>,
    ) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "INSERT INTO event_types (name, description, schema) VALUES ($1, $2, $3::jsonb) \
             RETURNING ",
            event_type_cols!()
        ))
        .bind(name)
        .bind(description)
        .bind(schema)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "event type {name:?} already exists; update it instead"
                ))),
                Violation::ForeignKey(_) => None,
            })
        })?;
        Ok(event_type_from_row(&row)?)
    }

    async fn get_event_type(&self, name: &str) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_type_cols!(),
            " FROM event_types WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(event_type_from_row(&found(row, "event type", name)?)?)
    }

    async fn list_event_types(
        &self,
        include_archived: bool,
        page: &PageRequest,
    ) -> Result<Page<EventType>, StoreError> {
        let limit = effective_limit(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_type_cols!(),
            " FROM event_types WHERE name > $1 AND ($2 OR NOT archived) ORDER BY name LIMIT $3"
        ))
        .bind(cursor(page))
        .bind(include_archived)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = map_rows(&rows, event_type_from_row)?;
        Ok(into_page(items, limit, |t| t.name.clone()))
    }

    async fn update_event_type(
        &self,
        name: &str,
        description: Option<&str>,
        schema: Option<Option<&str>>,
        archived: Option<bool>,
    ) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE event_types SET description = COALESCE($2, description), \
             schema = CASE WHEN $3 THEN $4::jsonb ELSE schema END, \
             archived = COALESCE($5, archived), updated_at = now() \
             WHERE name = $1 RETURNING ",
            event_type_cols!()
        ))
        .bind(name)
        .bind(description)
        .bind(schema.is_some())
        .bind(schema.flatten())
        .bind(archived)
        .fetch_optional(&self.pool)
        .await?;
        Ok(event_type_from_row(&found(row, "event type", name)?)?)
    }

    async fn delete_event_type(&self, name: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM event_types WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("event type", name));
        }
        Ok(())
    }

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(concat!(
            "INSERT INTO api_keys (id, name, tenant_id, token_prefix, token_hash) \
             VALUES ($1, $2, $3, $4, $5) RETURNING ",
            api_key_cols!()
        ))
        .bind(new.id.as_str())
        .bind(&new.name)
        .bind(new.tenant_id.as_ref().map(Id::as_str))
        .bind(&new.token_prefix)
        .bind(&new.token_hash[..])
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique("api_keys_token_hash_key") => Some(StoreError::Conflict(
                    "an API key with the same token already exists; generate a new token"
                        .to_string(),
                )),
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "API key {} already exists; choose another id",
                    new.id
                ))),
                Violation::ForeignKey(_) => new
                    .tenant_id
                    .as_ref()
                    .map(|tenant| not_found("tenant", tenant)),
            })
        })?;
        Ok(api_key_from_row(&row)?)
    }

    async fn find_api_key_by_hash(&self, token_hash: &[u8; 32]) -> Result<ApiKey, StoreError> {
        // Also records when the key was last used, at most once a minute per key so that a
        // busy key does not turn every authentication into a write.
        let row = sqlx::query(concat!(
            "WITH key AS (SELECT ",
            api_key_cols!(),
            ", last_used_at FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL), \
             touched AS (UPDATE api_keys SET last_used_at = now() \
               WHERE id = (SELECT id FROM key) \
               AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')) \
             SELECT ",
            api_key_cols!(),
            " FROM key"
        ))
        .bind(&token_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(api_key_from_row(&found(
            row,
            "API key",
            "for the presented token",
        )?)?)
    }

    async fn list_api_keys(
        &self,
        tenant_id: Option<&Id>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let limit = effective_limit(page);
        // Two statements rather than `IS NOT DISTINCT FROM`, which no index can serve.
        let query = match tenant_id {
            Some(tenant) => sqlx::query(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
            ))
            .bind(tenant.as_str()),
            None => sqlx::query(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id IS NULL AND id > $1 ORDER BY id LIMIT $2"
            )),
        };
        let rows = query
            .bind(cursor(page))
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let items = map_rows(&rows, api_key_from_row)?;
        Ok(into_page(items, limit, |k| k.id.to_string()))
    }

    async fn get_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            api_key_cols!(),
            " FROM api_keys WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(api_key_from_row(&found(row, "API key", id)?)?)
    }

    async fn revoke_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        // Revoking twice keeps the first revocation time.
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 \
             RETURNING ",
            api_key_cols!()
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(api_key_from_row(&found(row, "API key", id)?)?)
    }

    async fn set_circuit_open_until(
        &self,
        id: &Id,
        until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        // Runtime state, not configuration: `updated_at` stays.
        sqlx::query("UPDATE subscriptions SET circuit_open_until = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(until)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn circuit_open_until(&self, id: &Id) -> Result<Option<DateTime<Utc>>, StoreError> {
        let until: Option<Option<DateTime<Utc>>> =
            sqlx::query_scalar("SELECT circuit_open_until FROM subscriptions WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(until.flatten())
    }
}

#[async_trait]
impl StoreHealth for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn stats(&self) -> Result<crate::port::PipelineStats, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM retry_schedule) AS backlog, \
                    (SELECT min(due_at) FROM retry_schedule) AS oldest, \
                    (SELECT count(*) FROM delivery_outbox) AS outbox, \
                    (SELECT count(*) FROM subscriptions WHERE state = 'enabled') AS enabled, \
                    (SELECT count(*) FROM subscriptions WHERE state = 'disabled') AS disabled",
        )
        .fetch_one(&self.pool)
        .await?;
        let count = |name: &str| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
        };
        Ok(crate::port::PipelineStats {
            retry_backlog: count("backlog")?,
            oldest_due_retry: row.try_get("oldest")?,
            outbox: count("outbox")?,
            subscriptions_enabled: count("enabled")?,
            subscriptions_disabled: count("disabled")?,
        })
    }
}

/// Inserts `secret` as a secret of `subscription_id` inside `tx`.
async fn insert_secret(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: &Id,
    secret: &SubscriptionSecret,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO subscription_secrets (id, subscription_id, secret, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(secret.id.as_str())
    .bind(subscription_id.as_str())
    .bind(&secret.secret)
    .bind(secret.created_at)
    .bind(secret.expires_at)
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        map_violation(e, |v| match v {
            Violation::Unique("subscription_secrets_pkey") => Some(StoreError::Conflict(format!(
                "secret {} already exists; generate a new secret id",
                secret.id
            ))),
            Violation::Unique(_) => Some(StoreError::Conflict(format!(
                "subscription {subscription_id} already has a current secret; rotate it instead"
            ))),
            Violation::ForeignKey(_) => Some(not_found("subscription", subscription_id)),
        })
    })?;
    Ok(())
}
