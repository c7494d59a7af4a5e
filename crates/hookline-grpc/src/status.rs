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
        other if other.is_out_of_space() => {
            tracing::error!(error = %other, "the database is out of space");
            Status::unavailable(
                "the database is out of disk space: nothing was stored; earlier events are safe; \
                 try again once the operator has freed space",
            )
        }
        StoreError::Quota(q) => from_quota(q),
        StoreError::Sealing(msg) => {
            tracing::error!(error = %msg, "a sealed secret cannot be opened");
            Status::internal(
                "a stored secret cannot be opened with this server's encryption keyring; the \
                 operator must add the key that sealed it (HOOKLINE_ENCRYPTION_KEY)",
            )
        }
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
