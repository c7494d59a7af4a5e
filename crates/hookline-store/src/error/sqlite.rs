//! What an error SQLite itself reported means, read from its primary result code. It sits
//! beside [`super::translate`], which picks it by the driver's error type, so the shared
//! translation does not depend on the adapter (the adapter's `error` module reads its
//! violated constraints).

use sqlx::error::DatabaseError;

use super::StoreError;

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
pub(super) fn database(db: &dyn DatabaseError) -> StoreError {
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
