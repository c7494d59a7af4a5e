//! PostgreSQL's errors as [`StoreError`]s: its SQLSTATE codes read once, here, and its
//! violated constraints by name, so the port never shows a driver error.

use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::postgres::PgDatabaseError;

use crate::StoreError;
use crate::error::translate;

/// What an error PostgreSQL reported means for the caller, by SQLSTATE class.
pub(crate) fn database(db: &dyn DatabaseError) -> StoreError {
    let code = db.code().unwrap_or_default();
    let message = db.message().to_string();
    match code.as_ref() {
        // serialization_failure, deadlock_detected, lock_not_available
        "40001" | "40P01" | "55P03" => StoreError::Retryable(format!(
            "the write collided with another and was rolled back ({message}); try again"
        )),
        "53100" => StoreError::Unavailable {
            message,
            out_of_space: true,
        },
        // connection exceptions, insufficient resources, operator intervention
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57") => {
            StoreError::unavailable(message)
        }
        // data exceptions: a value the column cannot take
        c if c.starts_with("22") => {
            let column = db
                .try_downcast_ref::<PgDatabaseError>()
                .and_then(PgDatabaseError::column)
                .unwrap_or("value");
            StoreError::invalid(column, message)
        }
        _ => StoreError::Internal(format!("database error {code}: {message}")),
    }
}

/// A violated constraint, by kind and name.
pub(super) enum Violation<'a> {
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

/// Turns a violated constraint into the error `f` names for it, or translates the error.
pub(super) fn map_violation(
    err: sqlx::Error,
    f: impl FnOnce(Violation<'_>) -> Option<StoreError>,
) -> StoreError {
    violation(&err)
        .and_then(f)
        .unwrap_or_else(|| translate(err))
}

/// The value PostgreSQL names in a violation's detail (`Key (tenant_id)=(ten_…) is not
/// present in table "tenants".`), to say which of a batch's records was at fault.
pub(super) fn violating_value(err: &sqlx::Error) -> Option<String> {
    let detail = err
        .as_database_error()?
        .try_downcast_ref::<PgDatabaseError>()?
        .detail()?;
    let start = detail.find(")=(")? + 3;
    let len = detail[start..].find(')')?;
    Some(detail[start..start + len].to_string())
}
