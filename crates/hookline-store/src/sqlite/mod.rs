//! The SQLite adapter of the storage port, for the embedded (one-process) mode.
//!
//! `hookline serve` with no database configured runs every service in one process on one
//! SQLite file, which the embedded queue (`hookline-broker`'s `EmbeddedBroker`) shares through
//! [`SqliteStore::pool`]. Services see only the port's traits, so this adapter answers exactly
//! like the PostgreSQL one: same ordering, pagination cursors, idempotency, and the same
//! `NotFound`/`Conflict` errors with the same messages. The schema is `migrations/sqlite`.
//! This module owns the pools and the clock; the port's traits are implemented in
//! `registry` ([`crate::port::RegistryStore`], `quotas` for a tenant's limits), `events`
//! ([`crate::port::EventStore`]) and `deliveries` ([`crate::port::DeliveryStore`]); `rows`
//! decodes records, `bulk` builds multi-row inserts and `error` translates SQLite's errors.
//! What does not depend on the database lives in the crate's shared modules.
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

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Connection, Row, Sqlite, Transaction};

use crate::StoreError;
use crate::error::{Db, translate};
use crate::port::StoreHealth;
use rows::from_micros;

/// The schema, embedded at build time from `migrations/sqlite`. The workspace leaves sqlx's
/// `macros` feature off (no database at build time), so the proc macro that `migrate!`
/// forwards to is called directly; it reads files, never a database.
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
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::unavailable(format!("creating {}: {e}", parent.display()))
            })?;
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
            .await
            .db()?;
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
            .map_err(|e| translate(e.into()))
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
        let tx = self.writer.begin_with("BEGIN IMMEDIATE").await.db()?;
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
// The modules come after the column lists so that they can use them.
mod bulk;
mod client_certs;
mod deliveries;
pub(crate) mod error;
mod events;
mod heads;
mod ordered;
mod quotas;
mod registry;
mod rows;
mod sealing;
mod secrets;

/// A set of ids as the JSON array that `json_each(?)` takes apart.
fn id_array<'a>(ids: impl IntoIterator<Item = &'a str>) -> Json<Vec<&'a str>> {
    Json(ids.into_iter().collect())
}

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await.db()?;
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
        .await
        .db()?;
        let count = |name: &str| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<i64, _>(name).db()?).unwrap_or(0))
        };
        let oldest: Option<i64> = row.try_get("oldest").db()?;
        Ok(crate::port::PipelineStats {
            retry_backlog: count("backlog")?,
            oldest_due_retry: oldest.map(|m| from_micros("due_at", m)).transpose().db()?,
            outbox: count("outbox")?,
            subscriptions_enabled: count("enabled")?,
            subscriptions_disabled: count("disabled")?,
        })
    }
}
