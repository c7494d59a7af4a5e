//! Plumbing shared by every Hookline gRPC server, so each service holds only its own logic:
//! API-key authentication (`auth`, callers in `principal`) checked before a body is read (`gate`, `body`), limits
//! per key (`keys`) and per connection (`conn`), mapping of domain errors to gRPC statuses (`status`),
//! conversion between domain records and wire messages (`convert`), and the health and
//! reflection services every server mounts (`standard`).

pub mod auth;
pub mod body;
pub mod conn;
pub mod convert;
pub mod gate;
pub mod keys;
pub mod principal;
pub mod served;
pub mod standard;
pub mod status;
pub mod tls;

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

/// A store page as the wire has it: the converted items and the `next_page_token` (empty
/// on the last page). Every list response is built from this.
pub fn page_response<T, W>(
    page: hookline_store::port::Page<T>,
    convert: impl FnMut(T) -> W,
) -> (Vec<W>, String) {
    (
        page.items.into_iter().map(convert).collect(),
        page.next_cursor.unwrap_or_default(),
    )
}
