//! SQLite's violated constraints (its result codes are read once, in `crate::error`, beside
//! the shared translation). SQLite does not name a violated constraint (only the columns of
//! a unique one, and nothing of a foreign key), so the adapter checks what it must name
//! before it writes (see the adapter's docs).

use sqlx::error::ErrorKind;

use crate::StoreError;
use crate::error::translate;

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
