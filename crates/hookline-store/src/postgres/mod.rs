//! The PostgreSQL adapter of the storage port, for clusters.
//!
//! Every service of a cluster shares one PostgreSQL database as its source of truth. This
//! module owns the schema (the embedded migrations in `migrations/postgres`) and the pool;
//! the port's traits are implemented with plain `sqlx::query` calls (so the crate builds
//! without a database) in `registry` ([`crate::port::RegistryStore`], `quotas` for a
//! tenant's limits), `events` ([`crate::port::EventStore`]: ingest and the outbox) and
//! `deliveries` ([`crate::port::DeliveryStore`]: attempts, the retry schedule, manual
//! retries). `rows` decodes records, `error` translates PostgreSQL's errors. What does not
//! depend on the database (paging, limits, insert planning, the outcome state machine)
//! lives in the crate's shared modules.
//!
//! Conventions of the mapping:
//! * ids are stored as their text form (`ten_01J…`, collation "C") and parsed back with their
//!   kind, so a corrupt row is reported instead of producing a wrong-kind id;
//! * pagination is keyset (see `crate::paging`);
//! * `BTreeMap<String, String>` is a jsonb object, `Vec<Duration>` a `bigint[]` of
//!   milliseconds, `u32` an `integer`;
//! * violated constraints are read by name and become [`StoreError::Conflict`] (unique) or
//!   [`StoreError::NotFound`] (a foreign key to something that is not there).
//! * statements that look up rows of a table that grows (`deliveries`, `events`, the
//!   outbox and the retry schedule) by an array of keys are sent `persistent(false)`, so
//!   PostgreSQL plans them afresh with the table's current size each time. A prepared
//!   statement's generic plan is kept until the next ANALYZE: one planned while the table
//!   was small (a new database, the first minute of a benchmark) scans every row of it on
//!   each call, and a batch's cost grew with the table (docs/BENCHMARKS.md, pass 4). The
//!   hottest insert (`insert_events`) joins only its own input and `subscriptions`, and
//!   stays prepared.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::StoreError;
use crate::error::{Db, translate};
use crate::port::StoreHealth;

/// The schema, embedded at build time from `migrations/postgres`.
///
/// The workspace leaves sqlx's `macros` feature off (no compile-time checked queries, so no
/// database at build time); that feature only gates the `sqlx::migrate!` wrapper, so the
/// proc macro it forwards to is called directly. It reads files, never a database.
pub static MIGRATOR: Migrator = sqlx::sqlx_macros::migrate!("./migrations/postgres");

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
            .parse::<sqlx::postgres::PgConnectOptions>()
            .db()?
            .options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .db()?;
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
            .map_err(|e| translate(e.into()))
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
         max_events_per_second, weight, created_at, updated_at"
    };
}

macro_rules! subscription_cols {
    () => {
        "id, tenant_id, url, description, event_types, channels, headers, \
         rate_limit_per_second, max_in_flight, retry_schedule_ms, state, disabled_reason, \
         metadata, created_at, updated_at, payload_format, ordering"
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

// The modules come after the column lists so that they can use them.
mod client_certs;
mod deliveries;
pub(crate) mod error;
mod events;
mod ordered;
mod quotas;
mod registry;
mod rows;
mod sealing;
mod secrets;

#[async_trait]
impl StoreHealth for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.db()?;
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
        .await
        .db()?;
        let count = |name: &str| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<i64, _>(name).db()?).unwrap_or(0))
        };
        Ok(crate::port::PipelineStats {
            retry_backlog: count("backlog")?,
            oldest_due_retry: row.try_get("oldest").db()?,
            outbox: count("outbox")?,
            subscriptions_enabled: count("enabled")?,
            subscriptions_disabled: count("disabled")?,
        })
    }
}
