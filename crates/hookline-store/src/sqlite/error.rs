//! SQLite's errors as [`StoreError`]s: its result codes read once, here. SQLite does not
//! name a violated constraint (only the columns of a unique one, and nothing of a foreign
//! key), so the adapter checks what it must name before it writes (see the adapter's docs).

use sqlx::error::{DatabaseError, ErrorKind};

use crate::StoreError;
use crate::error::translate;

// Primary result codes (the driver reports extended ones; the low byte is the primary).
const SQLITE_NOMEM: i64 = 7;
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_READONLY: i64 = 8;
const SQLITE_IOERR: i64 = 10;
const SQLITE_FULL: i64 = 13;
const SQLITE_CANTOPEN: i64 = 14;
const SQLITE_TOOBIG: i64 = 18;

/// What an error SQLite reported means for the caller, by primary result code.
pub(crate) fn database(db: &dyn DatabaseError) -> StoreError {
    let code = db
        .code()
        .and_then(|c| c.parse::<i64>().ok())
        .map(|c| c & 0xff);
    let message = db.message().to_string();
    match code {
        Some(SQLITE_BUSY | SQLITE_LOCKED) => StoreError::Retryable(format!(
            "the database was locked by another writer for too long ({message}); try again"
        )),
        Some(SQLITE_FULL) => StoreError::Unavailable {
            message,
            out_of_space: true,
        },
        _ if message.contains("disk is full") => StoreError::Unavailable {
            message,
            out_of_space: true,
        },
        Some(SQLITE_NOMEM | SQLITE_READONLY | SQLITE_IOERR | SQLITE_CANTOPEN) => {
            StoreError::unavailable(message)
        }
        Some(SQLITE_TOOBIG) => StoreError::invalid("value", message),
        _ => StoreError::Internal(format!("database error {code:?}: {message}")),
    }
}

/// A violated constraint. SQLite names the columns of a violated unique constraint
/// (`UNIQUE constraint failed: api_keys.token_hash`) and nothing of a foreign key.
pub(super) enum Violation<'a> {
    /// The columns, `table.column[, table.column…]`.
    Unique(&'a str),
    ForeignKey,
}

pub(super) fn violation(err: &sqlx::Error) -> Option<Violation<'_>> {
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

/// Turns a violated constraint into the error `f` names for it, or translates the error.
pub(super) fn map_violation(
    err: sqlx::Error,
    f: impl FnOnce(Violation<'_>) -> Option<StoreError>,
) -> StoreError {
    let mapped = violation(&err).and_then(f);
    mapped.unwrap_or_else(|| translate(err))
}
