//! Storage for Hookline: the port (traits in [`port`]) and its adapters.
//!
//! Services depend on the traits only; [`postgres::PgStore`] backs them with PostgreSQL for
//! clusters. The schema for the whole pipeline lives in `migrations/postgres` and is embedded
//! in the binary ([`postgres::MIGRATOR`]).

pub mod port;
pub mod postgres;
pub mod sealed;
pub mod sealing;
pub mod sqlite;

pub use port::{
    AttemptOutcome, DeliveryFilter, DeliveryStore, EventFilter, EventStore, InsertOutcome,
    NewApiKey, NewEvent, NewSubscription, NextStep, Page, PageRequest, RegistryStore, StoreHealth,
};
pub use postgres::PgStore;
pub use sealed::SealedRegistry;
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
    /// A sealed value could not be opened (a key missing from the keyring, or damage).
    #[error("cannot open a sealed value: {0}")]
    Sealing(String),
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
