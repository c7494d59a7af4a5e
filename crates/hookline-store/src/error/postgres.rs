//! What an error PostgreSQL itself reported means, read from its SQLSTATE code. It sits
//! beside [`super::translate`], which picks it by the driver's error type, so the shared
//! translation does not depend on the adapter (the adapter's `error` module names its
//! violated constraints).

use sqlx::error::DatabaseError;
use sqlx::postgres::PgDatabaseError;

use super::StoreError;

/// What an error PostgreSQL reported means for the caller, by SQLSTATE class.
pub(super) fn database(db: &dyn DatabaseError) -> StoreError {
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
