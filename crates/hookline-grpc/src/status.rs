//! Domain errors as gRPC statuses with messages a person can act on.

use hookline_core::id::IdError;
use hookline_core::quota::QuotaExceeded;
use hookline_core::validate::ValidationError;
use hookline_store::StoreError;
use tonic::Status;

pub fn from_store(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { entity, id } => {
            Status::not_found(format!("{entity} {id} not found"))
        }
        StoreError::Conflict(msg) => Status::already_exists(msg),
        StoreError::Quota(q) => from_quota(q),
        other => {
            tracing::error!(error = %other, "database error");
            Status::unavailable("the database is unavailable; try again shortly")
        }
    }
}

/// `RESOURCE_EXHAUSTED`: over a tenant's quota (the message says which and how to raise it).
pub fn from_quota(e: QuotaExceeded) -> Status {
    Status::resource_exhausted(e.to_string())
}

pub fn from_validation(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub fn from_id(e: IdError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// `INVALID_ARGUMENT` for a field.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}
