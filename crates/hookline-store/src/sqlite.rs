//! The SQLite adapter of the storage port, for the embedded (one-process) mode.
//!
//! `hookline serve` with no database configured runs every service in one process on one
//! SQLite file, which the embedded queue (`hookline-broker`'s `EmbeddedBroker`) shares through
//! [`SqliteStore::pool`]. Services see only the port's traits, so this adapter answers exactly
//! like the PostgreSQL one: same ordering, pagination cursors, idempotency, and the same
//! `NotFound`/`Conflict` errors with the same messages. The schema is `migrations/sqlite`.
//! The control plane ([`RegistryStore`]) lives here; the data plane in `events`
//! ([`crate::port::EventStore`]) and `deliveries` ([`crate::port::DeliveryStore`]).
//!
//! # Writes: one writer connection, and `BEGIN IMMEDIATE`
//!
//! SQLite admits one writer at a time. Two rules follow:
//!
//! * **Every write runs in a `BEGIN IMMEDIATE` transaction**, which takes the write lock when
//!   it begins. A deferred transaction that reads and then writes would try to upgrade its
//!   read lock; if another connection committed meanwhile, SQLite answers `SQLITE_BUSY`
//!   without waiting (its snapshot is stale), which no busy timeout can cure. Holding the
//!   write lock from the start also makes a write transaction exclusive, which is what the
//!   PostgreSQL adapter gets from row locks and `FOR UPDATE SKIP LOCKED`: a claim is a plain
//!   select-then-update, and a check ("does this tenant exist?", "is this idempotency key
//!   used?") stays true until the commit.
//! * **The store's writes share one connection** (a pool of one, opened by [`SqliteStore::open`]),
//!   so concurrent writers of this process queue in the pool, in order, and are woken the
//!   moment the connection is free, instead of polling the file lock through SQLite's busy
//!   handler (which sleeps up to 100 ms between tries). Reads use a separate pool of
//!   [`READ_CONNECTIONS`]; in WAL mode they never wait for the writer. The embedded queue
//!   writes through the read pool with its own `BEGIN IMMEDIATE` transactions; it and the
//!   store's writer meet at the file lock, which the busy timeout ([`BUSY_TIMEOUT`]) waits
//!   for. [`SqliteStore::from_pool`] uses one pool for both; the first rule keeps that correct.
//!
//! Each statement is a round trip to the connection's worker thread in sqlx (tens of µs), so
//! statements do not grow with a batch: rows go in with multi-row `INSERT … VALUES`
//! statements (`BulkInsert`), and sets of ids travel as one JSON array parameter
//! (`id IN (SELECT value FROM json_each(?))`), the counterpart of PostgreSQL's `= ANY($1)`.
//!
//! # Durability
//!
//! The database is in WAL mode. A transaction is committed when its frames are in the
//! write-ahead log, so with `synchronous = NORMAL` a crash or SIGKILL of the process loses
//! nothing committed (the log is in the operating system's cache, and the next open
//! replays it); only an OS crash or power loss can lose the last transactions.
//! `synchronous = FULL` also fsyncs the log at every commit, which survives power loss too
//! but cost 1–3 ms per commit on the development machine: single-event publishes ran at
//! roughly 300–900/s with FULL against 600–1,600/s with NORMAL on the shared, loaded
//! 2-core VM, and every commit of the embedded queue (same file, same setting) pays it as
//! well. The embedded mode promises that a crash or SIGKILL loses no acknowledged event
//! and no scheduled retry, which NORMAL keeps (`tests/sqlite.rs` SIGKILLs a writer to prove
//! it), so [`SqliteStore::open`] uses [`Durability::Process`]; [`SqliteStore::open_with`]
//! takes [`Durability::PowerLoss`] for sites that want FULL and can afford it.
//!
//! # Mapping
//!
//! * ids are TEXT compared bytewise (SQLite's BINARY collation = PostgreSQL's "C"), parsed
//!   back with their kind;
//! * timestamps are INTEGER microseconds since the Unix epoch: PostgreSQL's precision, and
//!   integers sort and compare correctly whatever wrote them, which text timestamps do only
//!   if every writer used one fixed-width format. Times the store stamps itself (`created_at`
//!   of deliveries, every `updated_at`, the outbox) are read from a clock that is taken
//!   *after* the write lock, and that never repeats or goes back within the process, so
//!   change order is commit order (what `deliveries_updated_after` followers rely on);
//! * `BTreeMap<String, String>`, string lists and the retry schedule (milliseconds) are JSON
//!   TEXT; payloads BLOBs; integers that PostgreSQL keeps in `integer` are held to the same
//!   range here, so both adapters refuse the same inputs;
//! * SQLite does not name the violated constraint (only the columns of a unique one, and
//!   nothing for a foreign key), so where the PostgreSQL adapter reads the name to say what
//!   was wrong, this one checks first, inside the (exclusive) write transaction.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
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
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Connection, Row, Sqlite, Transaction};

use crate::StoreError;
use crate::port::{NewApiKey, NewSubscription, Page, PageRequest, RegistryStore, StoreHealth};
use crate::postgres::effective_limit;

/// The schema, embedded at build time from `migrations/sqlite` (see
/// [`crate::postgres::MIGRATOR`] for why the proc macro is called directly).
pub static MIGRATOR: Migrator = sqlx::sqlx_macros::migrate!("./migrations/sqlite");

/// Connections of the read pool (also the pool the embedded queue is given). Readers never
/// wait for the writer in WAL mode, so a few serve many tasks; each is a thread in sqlx.
pub const READ_CONNECTIONS: u32 = 6;
/// How long a connection waits for the file's write lock held by another connection (the
/// embedded queue's writer, another process) before failing with `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write waits for the store's writer connection. Writers queue here, so this
/// bounds the queue rather than one transaction.
const WRITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a read waits for a connection of the read pool.
const READ_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a committed transaction survives (SQLite's `synchronous` setting in WAL mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous = NORMAL`: a crash or SIGKILL of the process loses nothing committed; an
    /// OS crash or power loss may lose the last transactions. No fsync per commit.
    #[default]
    Process,
    /// `synchronous = FULL`: power loss loses nothing committed either, at an fsync of the
    /// write-ahead log per commit.
    PowerLoss,
}

impl Durability {
    fn synchronous(self) -> SqliteSynchronous {
        match self {
            Durability::Process => SqliteSynchronous::Normal,
            Durability::PowerLoss => SqliteSynchronous::Full,
        }
    }
}

/// The storage port on SQLite. Cheap to clone: clones share the pools and the clock.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads, and the pool handed to adapters of other ports ([`Self::pool`]).
    reader: SqlitePool,
    /// Every write of the store: one connection (or `reader` again, see [`Self::from_pool`]).
    writer: SqlitePool,
    clock: Arc<Clock>,
}

/// Pool settings of both pools: a connection still inside a transaction is never handed
/// out again.
///
/// When a write fails with `SQLITE_FULL` (disk full) or `SQLITE_IOERR`, SQLite may roll
/// the whole transaction back by itself; sqlx's `ROLLBACK` on drop then fails ("no
/// transaction is active") and its connection keeps counting one open transaction, so
/// every later `BEGIN IMMEDIATE` on it failed with "attempted to call begin_with at
/// non-zero transaction depth" and the store never wrote again, even once space returned.
/// Such a connection is closed here and a fresh one opened.
fn pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new().before_acquire(|conn, _meta| {
        Box::pin(async move {
            if conn.is_in_transaction() {
                // The rollback of a dropped transaction may still be queued on the
                // connection's worker: let it run, then look again.
                conn.ping().await?;
            }
            Ok(!conn.is_in_transaction())
        })
    })
}

impl SqliteStore {
    /// Opens the database file at `path` with [`Durability::Process`], creating the file and
    /// its missing parent directories (a bare file name is relative to the working
    /// directory). Run [`Self::migrate`] before use.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::default()).await
    }

    /// Opens the database file at `path` as [`Self::open`] does: WAL mode, foreign keys on,
    /// `synchronous` as `durability` says, a busy timeout of [`BUSY_TIMEOUT`], one writer
    /// connection and [`READ_CONNECTIONS`] readers. One connection is opened here, so an
    /// unusable path fails now.
    pub async fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Database(e.into()))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(durability.synchronous())
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // Keep the log from growing without bound after a burst: once checkpointed,
            // it is truncated to this size.
            .pragma("journal_size_limit", (64 * 1024 * 1024).to_string());
        // The writer connects first: switching a new file to WAL needs the only connection.
        let writer = pool_options()
            .max_connections(1)
            .acquire_timeout(WRITE_ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let reader = pool_options()
            .max_connections(READ_CONNECTIONS)
            .acquire_timeout(READ_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self {
            reader,
            writer,
            clock: Arc::default(),
        })
    }

    /// Wraps an existing pool (shared with other adapters of the same process), used for
    /// reads and writes alike. Its connections must be in WAL mode with foreign keys on
    /// (sqlx's default) and a busy timeout; writes are still `BEGIN IMMEDIATE`, so they are
    /// correct, but they wait for each other through the busy timeout rather than in a queue.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            reader: pool.clone(),
            writer: pool,
            clock: Arc::default(),
        }
    }

    /// Applies the pending migrations (on the writer connection, so never twice at once in
    /// this process); a no-op on an up-to-date database.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::Database(e.into()))
    }

    /// The read pool, for adapters of other ports that share the file (the embedded queue).
    /// Whoever writes through it must use `BEGIN IMMEDIATE` transactions (see the module docs).
    pub fn pool(&self) -> &SqlitePool {
        &self.reader
    }

    /// Closes both pools and waits for their connections to close (the last one checkpoints
    /// the write-ahead log into the database file).
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE` on the writer) and reads the clock once
    /// the write lock is held: the time to stamp on what the transaction writes.
    async fn write(&self) -> Result<(Transaction<'static, Sqlite>, i64), StoreError> {
        let tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        Ok((tx, self.clock.now()))
    }
}

/// Microseconds since the Unix epoch that never repeat or go back within the process, so
/// that the stamps of successive write transactions follow their commit order even when two
/// commit within a microsecond or the wall clock steps back.
#[derive(Debug, Default)]
struct Clock {
    last: AtomicI64,
}

impl Clock {
    fn now(&self) -> i64 {
        let wall = Utc::now().timestamp_micros();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Column lists, shared by every query that returns a record.
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
        "name, description, schema, archived, created_at, updated_at"
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

/// A delivery job of each delivery whose id is in the JSON array `?1`: the delivery row `d`
/// and its event's payload (rows in no particular order).
macro_rules! jobs_of_ids {
    () => {
        "SELECT d.id, d.event_id, d.tenant_id, d.subscription_id, d.event_type, \
         d.attempt_count, d.traceparent, e.payload \
         FROM json_each(?1) AS k CROSS JOIN deliveries AS d ON d.id = k.value \
         JOIN events AS e ON e.id = d.event_id"
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

fn get_id(row: &SqliteRow, column: &str, kind: IdKind) -> Result<Id, sqlx::Error> {
    let raw: String = row.try_get(column)?;
    Id::parse(kind, column, &raw).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: Box::new(e),
    })
}

/// A time from its microseconds since the Unix epoch.
fn from_micros(column: &str, micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| decode_error(column, format!("timestamp {micros} µs is out of range")))
}

/// The microseconds since the Unix epoch that a time is stored as. Like PostgreSQL, finer
/// precision is dropped.
fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn get_time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    from_micros(column, row.try_get(column)?)
}

fn get_opt_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(column)?
        .map(|v| from_micros(column, v))
        .transpose()
}

/// An INTEGER column that holds a `u32` (counts, limits, attempt numbers).
fn get_u32(row: &SqliteRow, column: &str) -> Result<u32, sqlx::Error> {
    let raw: i64 = row.try_get(column)?;
    u32::try_from(raw).map_err(|_| decode_error(column, format!("value {raw} out of range")))
}

fn get_opt_u32(row: &SqliteRow, column: &str) -> Result<Option<u32>, sqlx::Error> {
    let raw: Option<i64> = row.try_get(column)?;
    raw.map(|v| {
        u32::try_from(v).map_err(|_| decode_error(column, format!("value {v} out of range")))
    })
    .transpose()
}

fn get_map(row: &SqliteRow, column: &str) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let Json(map): Json<BTreeMap<String, String>> = row.try_get(column)?;
    Ok(map)
}

fn get_strings(row: &SqliteRow, column: &str) -> Result<Vec<String>, sqlx::Error> {
    let Json(list): Json<Vec<String>> = row.try_get(column)?;
    Ok(list)
}

fn tenant_from_row(row: &SqliteRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: get_id(row, "id", IdKind::Tenant)?,
        name: row.try_get("name")?,
        metadata: get_map(row, "metadata")?,
        quotas: quotas::quotas_from_row(row)?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

fn subscription_from_row(row: &SqliteRow) -> Result<Subscription, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let state = SubscriptionState::parse(&state)
        .ok_or_else(|| decode_error("state", format!("unknown subscription state {state:?}")))?;
    let retry_ms: Option<Json<Vec<i64>>> = row.try_get("retry_schedule_ms")?;
    let retry_schedule = retry_ms
        .map(|Json(ms)| {
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
    })
}

fn secret_from_row(row: &SqliteRow) -> Result<SubscriptionSecret, sqlx::Error> {
    Ok(SubscriptionSecret {
        id: get_id(row, "id", IdKind::Secret)?,
        subscription_id: get_id(row, "subscription_id", IdKind::Subscription)?,
        secret: row.try_get("secret")?,
        created_at: get_time(row, "created_at")?,
        expires_at: get_opt_time(row, "expires_at")?,
    })
}

fn event_type_from_row(row: &SqliteRow) -> Result<EventType, sqlx::Error> {
    Ok(EventType {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        schema: row.try_get("schema")?,
        archived: row.try_get("archived")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

fn api_key_from_row(row: &SqliteRow) -> Result<ApiKey, sqlx::Error> {
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
        created_at: get_time(row, "created_at")?,
        revoked_at: get_opt_time(row, "revoked_at")?,
    })
}

fn map_rows<T>(
    rows: &[SqliteRow],
    f: fn(&SqliteRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter()
        .map(|r| f(r).map_err(StoreError::from))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Parameter encoding (the same limits as the PostgreSQL adapter, whose columns are `integer`)
// ---------------------------------------------------------------------------------------------

fn encode_error(message: String) -> StoreError {
    StoreError::Database(sqlx::Error::Encode(message.into()))
}

fn opt_u32_param(field: &str, value: Option<u32>) -> Result<Option<i64>, StoreError> {
    value
        .map(|v| {
            i32::try_from(v).map(i64::from).map_err(|_| {
                encode_error(format!(
                    "{field} is {v}; the largest value that can be stored is {}",
                    i32::MAX
                ))
            })
        })
        .transpose()
}

fn retry_schedule_param(
    schedule: Option<&[Duration]>,
) -> Result<Option<Json<Vec<i64>>>, StoreError> {
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
                .collect::<Result<Vec<_>, _>>()
                .map(Json)
        })
        .transpose()
}

/// A set of ids as the JSON array that `json_each(?)` takes apart.
fn id_array<'a>(ids: impl IntoIterator<Item = &'a str>) -> Json<Vec<&'a str>> {
    Json(ids.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Multi-row inserts
// ---------------------------------------------------------------------------------------------

/// Largest multi-row INSERT: 2^8 = 256 rows (at most 9 parameters each, far below SQLite's
/// limit of 32766).
const MAX_ROWS_LOG2: usize = 8;

/// A multi-row `INSERT … VALUES (…), (…)` of one table. A batch of any length is cut into
/// chunks of 256 rows and a power-of-two remainder (100 = 64 + 32 + 4), so that each table
/// has at most nine statement texts, which stay prepared in every connection's statement
/// cache.
pub(crate) struct BulkInsert {
    /// `INSERT INTO t (a, b) VALUES `
    head: &'static str,
    /// Placeholders of one row: `(?, ?)`.
    row: &'static str,
    /// What follows the rows (`ON CONFLICT …`), or "".
    tail: &'static str,
    sql: [OnceLock<String>; MAX_ROWS_LOG2 + 1],
}

impl BulkInsert {
    pub(crate) const fn new(head: &'static str, row: &'static str, tail: &'static str) -> Self {
        Self {
            head,
            row,
            tail,
            sql: [const { OnceLock::new() }; MAX_ROWS_LOG2 + 1],
        }
    }

    /// The statement for 2^`log2` rows.
    fn sql(&self, log2: usize) -> &str {
        self.sql[log2].get_or_init(|| {
            let rows = 1usize << log2;
            let mut sql = String::with_capacity(
                self.head.len() + rows * (self.row.len() + 2) + self.tail.len(),
            );
            sql.push_str(self.head);
            for i in 0..rows {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(self.row);
            }
            sql.push_str(self.tail);
            sql
        })
    }

    /// Inserts `rows`, `bind` adding the parameters of one row.
    pub(crate) async fn run<R>(
        &'static self,
        conn: &mut SqliteConnection,
        rows: &[R],
        bind: impl Fn(SqliteQuery, &R) -> SqliteQuery,
    ) -> Result<(), sqlx::Error> {
        let mut rest = rows;
        while !rest.is_empty() {
            let log2 = rest.len().ilog2().min(MAX_ROWS_LOG2 as u32) as usize;
            let (chunk, tail) = rest.split_at(1 << log2);
            let query = chunk.iter().fold(sqlx::query(self.sql(log2)), &bind);
            query.execute(&mut *conn).await?;
            rest = tail;
        }
        Ok(())
    }
}

/// A query on SQLite with its parameters.
pub(crate) type SqliteQuery = Query<'static, Sqlite, SqliteArguments>;

// ---------------------------------------------------------------------------------------------
// Pagination (the same rules as the PostgreSQL adapter)
// ---------------------------------------------------------------------------------------------

/// The lower bound of a keyset page. Every id and name is non-empty and compares greater
/// than "" bytewise, so the first page needs no separate query.
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

/// A violated constraint. SQLite names the columns of a violated unique constraint
/// (`UNIQUE constraint failed: api_keys.token_hash`) and nothing of a foreign key.
enum Violation<'a> {
    /// The columns, `table.column[, table.column…]`.
    Unique(&'a str),
    ForeignKey,
}

fn violation(err: &sqlx::Error) -> Option<Violation<'_>> {
    let db = err.as_database_error()?;
    match db.kind() {
        ErrorKind::UniqueViolation => Some(Violation::Unique(
            db.message()
                .strip_prefix("UNIQUE constraint failed: ")
                .unwrap_or(""),
        )),
        ErrorKind::ForeignKeyViolation => Some(Violation::ForeignKey),
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
impl RegistryStore for SqliteStore {
    async fn create_tenant(
        &self,
        id: &Id,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Tenant, StoreError> {
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO tenants (id, name, metadata, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?4) RETURNING ",
            tenant_cols!()
        ))
        .bind(id.as_str())
        .bind(name)
        .bind(Json(metadata))
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "tenant {id} already exists; choose another id"
                ))),
                Violation::ForeignKey => None,
            })
        })?;
        tx.commit().await?;
        Ok(tenant_from_row(&row)?)
    }

    async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenants WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.reader)
        .await?;
        Ok(tenant_from_row(&found(row, "tenant", id)?)?)
    }

    async fn list_tenants(&self, page: &PageRequest) -> Result<Page<Tenant>, StoreError> {
        let limit = effective_limit(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            tenant_cols!(),
            " FROM tenants WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))
        .bind(cursor(page))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
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
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE tenants SET name = COALESCE(?2, name), metadata = COALESCE(?3, metadata), \
             updated_at = ?4 WHERE id = ?1 RETURNING ",
            tenant_cols!()
        ))
        .bind(id.as_str())
        .bind(name)
        .bind(metadata.map(Json))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let row = found(row, "tenant", id)?;
        tx.commit().await?;
        Ok(tenant_from_row(&row)?)
    }

    async fn delete_tenant(&self, id: &Id) -> Result<(), StoreError> {
        // Foreign keys cascade to API keys, subscriptions (and their secrets), events and
        // everything downstream of them.
        let (mut tx, _) = self.write().await?;
        let done = sqlx::query("DELETE FROM tenants WHERE id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("tenant", id));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_tenant_quotas(
        &self,
        id: &Id,
        quotas: &TenantQuotas,
    ) -> Result<Tenant, StoreError> {
        let (mut tx, now) = self.write().await?;
        let tenant = quotas::set(&mut tx, now, id, quotas).await?;
        tx.commit().await?;
        Ok(tenant)
    }

    async fn create_subscription_within(
        &self,
        new: &NewSubscription,
        default_limit: u32,
    ) -> Result<Subscription, StoreError> {
        let rate_limit = opt_u32_param("rate_limit_per_second", new.rate_limit_per_second)?;
        let max_in_flight = opt_u32_param("max_in_flight", new.max_in_flight)?;
        let retry = retry_schedule_param(new.retry_schedule.as_deref())?;

        let (mut tx, now) = self.write().await?;
        quotas::check_subscriptions(&mut tx, &new.tenant_id, default_limit).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO subscriptions (id, tenant_id, url, description, event_types, channels, \
             headers, rate_limit_per_second, max_in_flight, retry_schedule_ms, state, \
             disabled_reason, metadata, created_at, updated_at, payload_format) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15) \
             RETURNING ",
            subscription_cols!()
        ))
        .bind(new.id.as_str())
        .bind(new.tenant_id.as_str())
        .bind(&new.url)
        .bind(&new.description)
        .bind(Json(&new.event_types))
        .bind(Json(&new.channels))
        .bind(Json(&new.headers))
        .bind(rate_limit)
        .bind(max_in_flight)
        .bind(retry)
        .bind(new.state.as_str())
        // A new subscription has no reason to be disabled yet (`NewSubscription` carries none).
        .bind(None::<&str>)
        .bind(Json(&new.metadata))
        .bind(now)
        .bind(new.payload_format.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "subscription {} already exists; choose another id",
                    new.id
                ))),
                // The tenant is the subscription's only foreign key.
                Violation::ForeignKey => Some(not_found("tenant", &new.tenant_id)),
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
            " FROM subscriptions WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.reader)
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
            " FROM subscriptions WHERE tenant_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
        ))
        .bind(tenant_id.as_str())
        .bind(cursor(page))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await?;
        let items = map_rows(&rows, subscription_from_row)?;
        Ok(into_page(items, limit, |s| s.id.to_string()))
    }

    async fn update_subscription(&self, sub: &Subscription) -> Result<Subscription, StoreError> {
        let rate_limit = opt_u32_param("rate_limit_per_second", sub.rate_limit_per_second)?;
        let max_in_flight = opt_u32_param("max_in_flight", sub.max_in_flight)?;
        let retry = retry_schedule_param(sub.retry_schedule.as_deref())?;
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE subscriptions SET url = ?2, description = ?3, event_types = ?4, \
             channels = ?5, headers = ?6, rate_limit_per_second = ?7, max_in_flight = ?8, \
             retry_schedule_ms = ?9, state = ?10, disabled_reason = ?11, metadata = ?12, \
             updated_at = ?13, payload_format = ?14 WHERE id = ?1 RETURNING ",
            subscription_cols!()
        ))
        .bind(sub.id.as_str())
        .bind(&sub.url)
        .bind(&sub.description)
        .bind(Json(&sub.event_types))
        .bind(Json(&sub.channels))
        .bind(Json(&sub.headers))
        .bind(rate_limit)
        .bind(max_in_flight)
        .bind(retry)
        .bind(sub.state.as_str())
        .bind(sub.disabled_reason.as_deref())
        .bind(Json(&sub.metadata))
        .bind(now)
        .bind(sub.payload_format.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let row = found(row, "subscription", &sub.id)?;
        tx.commit().await?;
        Ok(subscription_from_row(&row)?)
    }

    async fn delete_subscription(&self, id: &Id) -> Result<(), StoreError> {
        // Cascades to its secrets and deliveries (and their attempts and schedule).
        let (mut tx, _) = self.write().await?;
        let done = sqlx::query("DELETE FROM subscriptions WHERE id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("subscription", id));
        }
        tx.commit().await?;
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
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE subscriptions SET state = ?2, disabled_reason = ?3, updated_at = ?4 \
             WHERE id = ?1 RETURNING ",
            subscription_cols!()
        ))
        .bind(id.as_str())
        .bind(state.as_str())
        .bind(reason)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let row = found(row, "subscription", id)?;
        tx.commit().await?;
        Ok(subscription_from_row(&row)?)
    }

    async fn enabled_subscriptions(&self, tenant_id: &Id) -> Result<Vec<Subscription>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            subscription_cols!(),
            " FROM subscriptions WHERE tenant_id = ?1 AND state = 'enabled' ORDER BY id"
        ))
        .bind(tenant_id.as_str())
        .fetch_all(&self.reader)
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
             WHERE subscription_id = ?1 AND (expires_at IS NULL OR expires_at > ?2) \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(subscription_id.as_str())
        .bind(micros(now))
        .fetch_all(&self.reader)
        .await?;
        if rows.is_empty() {
            // A subscription always has a current secret, so nothing live means no
            // subscription; check, to tell the caller which.
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE id = ?1)")
                    .bind(subscription_id.as_str())
                    .fetch_one(&self.reader)
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
        let (mut tx, now) = self.write().await?;
        // Touching the subscription row checks it exists; the write transaction already
        // serialises concurrent rotations.
        let touched = sqlx::query("UPDATE subscriptions SET updated_at = ?2 WHERE id = ?1")
            .bind(sub_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if touched.rows_affected() == 0 {
            return Err(not_found("subscription", &new.subscription_id));
        }
        // Secrets already past their expiry are of no use to anyone.
        sqlx::query(
            "DELETE FROM subscription_secrets \
             WHERE subscription_id = ?1 AND expires_at IS NOT NULL AND expires_at <= ?2",
        )
        .bind(sub_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE subscription_secrets SET expires_at = ?2 \
             WHERE subscription_id = ?1 AND expires_at IS NULL",
        )
        .bind(sub_id)
        .bind(micros(old_expires_at))
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
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO event_types (name, description, schema, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?4) RETURNING ",
            event_type_cols!()
        ))
        .bind(name)
        .bind(description)
        .bind(schema)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "event type {name:?} already exists; update it instead"
                ))),
                Violation::ForeignKey => None,
            })
        })?;
        tx.commit().await?;
        Ok(event_type_from_row(&row)?)
    }

    async fn get_event_type(&self, name: &str) -> Result<EventType, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_type_cols!(),
            " FROM event_types WHERE name = ?1"
        ))
        .bind(name)
        .fetch_optional(&self.reader)
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
            " FROM event_types WHERE name > ?1 AND (?2 OR NOT archived) ORDER BY name LIMIT ?3"
        ))
        .bind(cursor(page))
        .bind(include_archived)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
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
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE event_types SET description = COALESCE(?2, description), \
             schema = CASE WHEN ?3 THEN ?4 ELSE schema END, \
             archived = COALESCE(?5, archived), updated_at = ?6 \
             WHERE name = ?1 RETURNING ",
            event_type_cols!()
        ))
        .bind(name)
        .bind(description)
        .bind(schema.is_some())
        .bind(schema.flatten())
        .bind(archived)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let row = found(row, "event type", name)?;
        tx.commit().await?;
        Ok(event_type_from_row(&row)?)
    }

    async fn delete_event_type(&self, name: &str) -> Result<(), StoreError> {
        let (mut tx, _) = self.write().await?;
        let done = sqlx::query("DELETE FROM event_types WHERE name = ?1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("event type", name));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError> {
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO api_keys (id, name, tenant_id, token_prefix, token_hash, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING ",
            api_key_cols!()
        ))
        .bind(new.id.as_str())
        .bind(&new.name)
        .bind(new.tenant_id.as_ref().map(Id::as_str))
        .bind(&new.token_prefix)
        .bind(&new.token_hash[..])
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_violation(e, |v| match v {
                Violation::Unique("api_keys.token_hash") => Some(StoreError::Conflict(
                    "an API key with the same token already exists; generate a new token"
                        .to_string(),
                )),
                Violation::Unique(_) => Some(StoreError::Conflict(format!(
                    "API key {} already exists; choose another id",
                    new.id
                ))),
                // The tenant is the key's only foreign key.
                Violation::ForeignKey => new
                    .tenant_id
                    .as_ref()
                    .map(|tenant| not_found("tenant", tenant)),
            })
        })?;
        tx.commit().await?;
        Ok(api_key_from_row(&row)?)
    }

    async fn find_api_key_by_hash(&self, token_hash: &[u8; 32]) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            api_key_cols!(),
            ", last_used_at FROM api_keys WHERE token_hash = ?1 AND revoked_at IS NULL"
        ))
        .bind(&token_hash[..])
        .fetch_optional(&self.reader)
        .await?;
        let row = found(row, "API key", "for the presented token")?;
        let key = api_key_from_row(&row)?;
        // Also records when the key was last used, at most once a minute per key so that a
        // busy key does not turn every authentication into a write (the read above decides;
        // the update checks again under the write lock).
        let last_used: Option<i64> = row.try_get("last_used_at")?;
        let stale = Utc::now().timestamp_micros() - MINUTE_MICROS;
        if last_used.is_none_or(|t| t < stale) {
            let (mut tx, now) = self.write().await?;
            sqlx::query(
                "UPDATE api_keys SET last_used_at = ?2 \
                 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?3)",
            )
            .bind(key.id.as_str())
            .bind(now)
            .bind(now - MINUTE_MICROS)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(key)
    }

    async fn list_api_keys(
        &self,
        tenant_id: Option<&Id>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let limit = effective_limit(page);
        // Two statements rather than `IS`, so that each uses the (tenant_id, id) index plainly.
        let query = match tenant_id {
            Some(tenant) => sqlx::query(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ))
            .bind(tenant.as_str()),
            None => sqlx::query(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE tenant_id IS NULL AND id > ?1 ORDER BY id LIMIT ?2"
            )),
        };
        let rows = query
            .bind(cursor(page))
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.reader)
            .await?;
        let items = map_rows(&rows, api_key_from_row)?;
        Ok(into_page(items, limit, |k| k.id.to_string()))
    }

    async fn get_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            api_key_cols!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.reader)
        .await?;
        Ok(api_key_from_row(&found(row, "API key", id)?)?)
    }

    async fn revoke_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        // Revoking twice keeps the first revocation time.
        let (mut tx, now) = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 \
             RETURNING ",
            api_key_cols!()
        ))
        .bind(id.as_str())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let row = found(row, "API key", id)?;
        tx.commit().await?;
        Ok(api_key_from_row(&row)?)
    }

    async fn set_circuit_open_until(
        &self,
        id: &Id,
        until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        // Runtime state, not configuration: `updated_at` stays.
        let (mut tx, _now) = self.write().await?;
        sqlx::query("UPDATE subscriptions SET circuit_open_until = ?2 WHERE id = ?1")
            .bind(id.as_str())
            .bind(until.map(micros))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn circuit_open_until(&self, id: &Id) -> Result<Option<DateTime<Utc>>, StoreError> {
        let until: Option<Option<i64>> =
            sqlx::query_scalar("SELECT circuit_open_until FROM subscriptions WHERE id = ?1")
                .bind(id.as_str())
                .fetch_optional(&self.reader)
                .await?;
        Ok(until
            .flatten()
            .map(|us| from_micros("circuit_open_until", us))
            .transpose()?)
    }
}

/// One minute in microseconds: how often a key's `last_used_at` is refreshed at most.
const MINUTE_MICROS: i64 = 60_000_000;

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
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
        .fetch_one(&self.reader)
        .await?;
        let count = |name: &str| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
        };
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(crate::port::PipelineStats {
            retry_backlog: count("backlog")?,
            oldest_due_retry: oldest.map(|m| from_micros("due_at", m)).transpose()?,
            outbox: count("outbox")?,
            subscriptions_enabled: count("enabled")?,
            subscriptions_disabled: count("disabled")?,
        })
    }
}

/// Inserts `secret` as a secret of `subscription_id` inside `tx`.
async fn insert_secret(
    tx: &mut Transaction<'_, Sqlite>,
    subscription_id: &Id,
    secret: &SubscriptionSecret,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO subscription_secrets (id, subscription_id, secret, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(secret.id.as_str())
    .bind(subscription_id.as_str())
    .bind(&secret.secret)
    .bind(micros(secret.created_at))
    .bind(secret.expires_at.map(micros))
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        map_violation(e, |v| match v {
            Violation::Unique("subscription_secrets.id") => Some(StoreError::Conflict(format!(
                "secret {} already exists; generate a new secret id",
                secret.id
            ))),
            Violation::Unique(_) => Some(StoreError::Conflict(format!(
                "subscription {subscription_id} already has a current secret; rotate it instead"
            ))),
            Violation::ForeignKey => Some(not_found("subscription", subscription_id)),
        })
    })?;
    Ok(())
}
