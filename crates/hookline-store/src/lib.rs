//! Storage for Hookline: the port (traits in [`port`]) and its adapters.
//!
//! Services depend on the traits only. Two adapters back them: [`postgres::PgStore`] with
//! PostgreSQL, for clusters and any number of replicas, and [`sqlite`] with one SQLite file,
//! for the embedded one-process mode (the embedded queue of `hookline-broker` shares that
//! file). Each has its own schema, `migrations/postgres` and `migrations/sqlite`, embedded in
//! the binary ([`postgres::MIGRATOR`], [`sqlite::MIGRATOR`]).

pub mod port;
pub mod postgres;
pub mod sqlite;

pub use port::{
    AttemptOutcome, DeliveryFilter, DeliveryStore, EventFilter, EventStore, InsertOutcome,
    NewApiKey, NewEvent, NewSubscription, NextStep, Page, PageRequest, RegistryStore, StoreHealth,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist (`entity` is a human noun: "tenant", "API key", …).
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },
    /// The write collides with a record that exists; the message says what to change.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The write would take the tenant over a quota; nothing was stored.
    #[error(transparent)]
    Quota(#[from] hookline_core::quota::QuotaExceeded),
    /// Anything else the database or the driver reported.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// True when the database could not write because its disk (or, for SQLite, its
    /// size limit) is full: SQLite's `SQLITE_FULL`, PostgreSQL's `53100 disk_full`.
    /// Writes fail until space is freed; nothing committed before is affected.
    pub fn is_out_of_space(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        match e.as_database_error() {
            Some(db) => {
                matches!(db.code().as_deref(), Some("13" | "53100"))
                    || db.message().contains("disk is full")
            }
            None => false,
        }
    }
}
