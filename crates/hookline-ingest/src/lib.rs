//! Ingest: the public write path.
//!
//! `Publish` and `PublishBatch` validate everything before storing anything, match the
//! tenant's subscriptions (from a cache that registry change announcements keep fresh),
//! store each event with one delivery per match in one transaction, then publish the
//! deliveries with publisher confirms. `GetEvent` and `ListEvents` read events back.
//! Payloads are checked against their event type's JSON Schema, and each tenant's quotas
//! (deliveries per event, events per second) are enforced before anything is stored.

mod backlog;
mod batcher;
mod detached;
mod matcher;
mod rate;
mod schemas;
mod service;

pub use backlog::BacklogLimit;
pub use matcher::{Matched, SubscriptionMatcher};
pub use service::{IngestApi, IngestConfig};
