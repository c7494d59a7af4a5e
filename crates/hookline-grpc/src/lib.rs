//! Plumbing shared by every Hookline gRPC server, so each service holds only its own logic:
//! API-key authentication (`auth`), mapping of domain errors to gRPC statuses (`status`),
//! conversion between domain records and wire messages (`convert`), and the health and
//! reflection services every server mounts (`standard`).

pub mod auth;
pub mod convert;
pub mod standard;
pub mod status;

pub use auth::{Authenticator, Principal};
