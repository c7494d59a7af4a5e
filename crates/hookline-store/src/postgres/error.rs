//! PostgreSQL's violated constraints by name, so the port never shows a driver error (its
//! SQLSTATE codes are read once, in `crate::error`, beside the shared translation).

use sqlx::error::ErrorKind;
use sqlx::postgres::PgDatabaseError;

use crate::StoreError;
use crate::error::translate;

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
