//! Domain errors as gRPC statuses with messages a person can act on.

use hookline_core::id::IdError;
use hookline_core::quota::QuotaExceeded;
use hookline_core::validate::ValidationError;
use hookline_store::StoreError;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The one mapping of store failures to gRPC codes, so a client can tell "fix your request"
/// (`NOT_FOUND`, `ALREADY_EXISTS`, `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`) from "try again"
/// (`ABORTED`: a lost race, try again now; `UNAVAILABLE`: the database is away) and from a
/// fault of the server (`INTERNAL`). The REST API maps these codes to HTTP statuses.
pub fn from_store(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { entity, id } => {
            Status::not_found(format!("{entity} {id} not found"))
        }
        StoreError::Conflict(msg) => Status::already_exists(msg),
        StoreError::InvalidInput { field, message } => invalid(&field, message),
        StoreError::Quota(q) => from_quota(q),
        StoreError::Retryable(msg) => Status::aborted(msg),
        other if other.is_out_of_space() => {
            tracing::error!(error = %other, "the database is out of space");
            Status::unavailable(
                "the database is out of disk space: nothing was stored; earlier events are safe; \
                 try again once the operator has freed space",
            )
        }
        other @ StoreError::Unavailable { .. } => {
            tracing::error!(error = %other, "database error");
            Status::unavailable("the database is unavailable; try again shortly")
        }
        other @ StoreError::Internal(_) => {
            tracing::error!(error = %other, "internal store error");
            Status::internal("internal error; the server log has the details")
        }
    }
}

/// `RESOURCE_EXHAUSTED` with a `RetryInfo` of `wait` (the REST API turns it into
/// `Retry-After`): a limit that frees up by itself.
pub fn exhausted_retry_in(message: impl Into<String>, wait: Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(wait)),
    )
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

/// The message of the `UNAVAILABLE` status that ends every open stream when a server
/// stops, so a client can tell a planned stop (reconnect) from a broken connection.
pub const SHUTTING_DOWN: &str = "server shutting down";

/// `UNAVAILABLE: server shutting down`: the last item of every stream open at a stop.
pub fn shutting_down() -> Status {
    Status::unavailable(SHUTTING_DOWN)
}

/// Whether `status` is a stopping server's planned end of a stream.
pub fn is_shutting_down(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message() == SHUTTING_DOWN
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn store_errors_tell_fix_your_request_from_try_again() {
        let code = |e: StoreError| from_store(e).code();
        assert_eq!(
            code(StoreError::invalid("url", "bad")),
            Code::InvalidArgument
        );
        assert_eq!(
            code(StoreError::Conflict("taken".into())),
            Code::AlreadyExists
        );
        assert_eq!(code(StoreError::Retryable("raced".into())), Code::Aborted);
        assert_eq!(code(StoreError::unavailable("down")), Code::Unavailable);
        assert_eq!(code(StoreError::Internal("corrupt".into())), Code::Internal);
        let full = StoreError::Unavailable {
            message: "disk full".into(),
            out_of_space: true,
        };
        assert!(from_store(full).message().contains("out of disk space"));
        let invalid = from_store(StoreError::invalid("page_size", "is 2000"));
        assert_eq!(invalid.message(), "page_size: is 2000");
    }
}
