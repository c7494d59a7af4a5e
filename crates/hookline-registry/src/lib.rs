//! The subscription registry: Hookline's control plane.
//!
//! It owns tenants, subscriptions, signing secrets, the event-type catalogue and API keys,
//! answers `MatchSubscriptions` for ingest, and announces every change on the broker's
//! fanout exchange so that caches elsewhere drop stale entries at once.

mod fields;
mod gate;
mod service;

pub use service::{RegistryApi, matching_subscriptions};
