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
pub mod standard;
pub mod status;

pub use auth::{Authenticator, Principal, principal};
pub use gate::{Gate, MessageLimits};

/// A page request from the wire; the rules of pages (the longest, what 0 means) are the
/// store port's ([`hookline_store::PageRequest::from_client`]).
pub fn page_request(
    page_size: u32,
    page_token: &str,
) -> Result<hookline_store::PageRequest, tonic::Status> {
    hookline_store::PageRequest::from_client(page_size, page_token).map_err(status::from_store)
}
