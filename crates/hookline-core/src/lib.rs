//! The domain of Hookline, free of I/O: identifiers, the records every service shares,
//! Standard Webhooks signing, retry-policy math, event-type filters, input validation and
//! the redaction of URLs in messages.
//! Every other crate builds on these definitions so that a rule lives in exactly one place.

pub mod client_cert;
pub mod filter;
pub mod fmt;
pub mod id;
pub mod job;
pub mod model;
pub mod quota;
pub mod redact;
pub mod retry;
pub mod schema;
pub mod sensitive;
pub mod signing;
pub mod validate;

pub use id::{Id, IdKind};
