//! What can go wrong in the store, in words a caller can act on.
//!
//! Driver errors become [`StoreError`]s here (each database's own codes in a submodule) and
//! in each adapter's `error` module (its violated constraints), so no database type leaks
//! out of the crate. The variants tell "fix your request"
//! ([`StoreError::NotFound`], [`StoreError::Conflict`], [`StoreError::InvalidInput`],
//! [`StoreError::Quota`]) from "try again" ([`StoreError::Retryable`],
//! [`StoreError::Unavailable`]) and from a fault of the server ([`StoreError::Internal`]).
//! The messages every adapter gives for the same failure are written once, below.

mod postgres;
mod sqlite;

use hookline_core::Id;
use hookline_core::quota::QuotaExceeded;

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist (`entity` is a human noun: "tenant", "API key", …).
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },
    /// The write collides with a record that exists; the message says what to change.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A value the store cannot hold as given (`field` names it); nothing was stored.
    #[error("{field}: {message}")]
    InvalidInput { field: String, message: String },
    /// The write would take the tenant over a quota; nothing was stored.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// The write lost a race (a deadlock, a serialization failure, a lock held too long, a
    /// record deleted meanwhile); nothing was stored and the same request may succeed now.
    #[error("{0}")]
    Retryable(String),
    /// The database cannot be reached or cannot write (connection, pool, disk); nothing was
    /// stored. `out_of_space` when its disk (or SQLite's size limit) is full.
    #[error("database unavailable: {message}")]
    Unavailable { message: String, out_of_space: bool },
    /// A fault of the store or its data (a corrupt row, an unexpected driver answer).
    #[error("internal store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// True when the database could not write because its disk (or, for SQLite, its
    /// size limit) is full: SQLite's `SQLITE_FULL`, PostgreSQL's `53100 disk_full`.
    /// Writes fail until space is freed; nothing committed before is affected.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable {
                out_of_space: true,
                ..
            }
        )
    }

    /// Whether writing the same thing again soon may succeed: a lost race, or a database
    /// that is away (but not one whose disk is full: that waits for an operator).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Retryable(_) => true,
            StoreError::Unavailable { out_of_space, .. } => !out_of_space,
            _ => false,
        }
    }

    /// [`StoreError::InvalidInput`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// [`StoreError::Unavailable`] for a database that cannot be reached.
    pub fn unavailable(message: impl Into<String>) -> Self {
        StoreError::Unavailable {
            message: message.into(),
            out_of_space: false,
        }
    }
}

/// `.db()` turns a driver result into the store's (see [`translate`]).
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(translate)
    }
}

/// A driver error as a [`StoreError`]: what does not depend on the database is decided
/// here (a connection or pool that fails is `Unavailable`; a row that does not decode, or
/// any other surprise of the driver, is `Internal`); an error the database itself reported
/// is read by the module that knows that database's codes (`postgres`, `sqlite` below).
pub(crate) fn translate(err: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    use sqlx::error::ErrorKind;
    match err {
        E::Database(db) => {
            let db = db.as_ref();
            // Constraints the adapter did not name (see its `map_violation`).
            match db.kind() {
                ErrorKind::UniqueViolation | ErrorKind::ForeignKeyViolation => {
                    return StoreError::Conflict(db.message().to_string());
                }
                ErrorKind::NotNullViolation | ErrorKind::CheckViolation => {
                    return StoreError::invalid("value", db.message());
                }
                _ => {}
            }
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                postgres::database(db)
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                sqlite::database(db)
            } else {
                StoreError::Internal(format!("database error: {}", db.message()))
            }
        }
        E::Io(_)
        | E::Tls(_)
        | E::Configuration(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed => StoreError::unavailable(err.to_string()),
        E::Migrate(m) => match *m {
            sqlx::migrate::MigrateError::Execute(inner) => translate(inner),
            other => StoreError::Internal(format!("migrating the schema: {other}")),
        },
        other => StoreError::Internal(other.to_string()),
    }
}

/// [`StoreError::NotFound`] for `entity` `id`.
pub(crate) fn not_found(entity: &'static str, id: impl ToString) -> StoreError {
    StoreError::NotFound {
        entity,
        id: id.to_string(),
    }
}

/// `Ok(row)` or NotFound when the query returned nothing.
pub(crate) fn found<T>(
    row: Option<T>,
    entity: &'static str,
    id: impl ToString,
) -> Result<T, StoreError> {
    row.ok_or_else(|| not_found(entity, id))
}

/// NotFound for the first of `asked` that is not among `existing` (in the order asked).
pub(crate) fn all_found<'a>(
    entity: &'static str,
    mut asked: impl Iterator<Item = &'a str>,
    existing: &std::collections::HashSet<String>,
) -> Result<(), StoreError> {
    match asked.find(|id| !existing.contains(*id)) {
        Some(missing) => Err(not_found(entity, missing)),
        None => Ok(()),
    }
}

/// The messages of violated constraints, the same from both adapters (each adapter says
/// which constraint was violated; these say what it means).
pub(crate) mod violated {
    use super::{Id, StoreError, not_found};

    fn conflict(message: String) -> StoreError {
        StoreError::Conflict(message)
    }

    pub(crate) fn tenant_exists(id: &Id) -> StoreError {
        conflict(format!("tenant {id} already exists; choose another id"))
    }

    pub(crate) fn subscription_exists(id: &Id) -> StoreError {
        conflict(format!(
            "subscription {id} already exists; choose another id"
        ))
    }

    pub(crate) fn event_type_exists(name: &str) -> StoreError {
        conflict(format!(
            "event type {name:?} already exists; update it instead"
        ))
    }

    pub(crate) fn api_key_token_taken() -> StoreError {
        conflict("an API key with the same token already exists; generate a new token".to_string())
    }

    pub(crate) fn api_key_exists(id: &Id) -> StoreError {
        conflict(format!("API key {id} already exists; choose another id"))
    }

    pub(crate) fn secret_exists(id: &Id) -> StoreError {
        conflict(format!(
            "secret {id} already exists; generate a new secret id"
        ))
    }

    pub(crate) fn current_secret_exists(subscription_id: &Id) -> StoreError {
        conflict(format!(
            "subscription {subscription_id} already has a current secret; rotate it instead"
        ))
    }

    pub(crate) fn event_exists(id: &str) -> StoreError {
        conflict(format!(
            "event {id} already exists; publish with a new event id"
        ))
    }

    /// A delivery id generated for the batch is taken: generating new ones will do.
    pub(crate) fn delivery_id_taken() -> StoreError {
        StoreError::Retryable("a generated delivery id is already taken; publish again".to_string())
    }

    pub(crate) fn attempt_id_elsewhere() -> StoreError {
        conflict(
            "an attempt id of the batch belongs to another delivery; \
             record it with a new attempt id"
                .to_string(),
        )
    }

    /// The event holding an idempotency key was deleted (with its tenant) between the
    /// insert and the look-up of the original.
    pub(crate) fn key_event_vanished(key: &str, tenant_id: &Id) -> StoreError {
        StoreError::Retryable(format!(
            "idempotency key {key:?} of tenant {tenant_id} was in use by an event \
             that was just deleted; publish again"
        ))
    }

    /// The tenant an insert names is not there.
    pub(crate) fn no_tenant(id: impl ToString) -> StoreError {
        not_found("tenant", id)
    }
}
