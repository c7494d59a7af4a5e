//! Plumbing shared by every Hookline gRPC server, so each service holds only its own logic:
//! API-key authentication (`auth`) checked before a body is read (`gate`, `body`), limits
//! per key (`keys`) and per connection (`conn`), mapping of domain errors to gRPC statuses (`status`),
//! conversion between domain records and wire messages (`convert`), and the health and
//! reflection services every server mounts (`standard`).

pub mod auth;
pub mod body;
pub mod conn;
pub mod convert;
pub mod gate;
pub mod keys;
pub mod served;
pub mod standard;
pub mod status;
pub mod tls;

pub use auth::{Authenticator, Principal, principal};
pub use gate::{Gate, MessageLimits};

/// Most items a list call returns at once.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A page request from the wire, refusing sizes over [`MAX_PAGE_SIZE`].
pub fn page_request(
    page_size: u32,
    page_token: &str,
) -> Result<hookline_store::PageRequest, tonic::Status> {
    if page_size > MAX_PAGE_SIZE {
        return Err(status::invalid(
            "page_size",
            format!("is {page_size}; the limit is {MAX_PAGE_SIZE} (0 means 50)"),
        ));
    }
    Ok(hookline_store::PageRequest {
        after: (!page_token.is_empty()).then(|| page_token.to_string()),
        limit: page_size,
    })
}
