//! Ingest: the public write path.
//!
//! `Publish` and `PublishBatch` validate everything before storing anything, match the
//! tenant's subscriptions (from a cache that registry change announcements keep fresh),
//! store each event with one delivery per match in one transaction, then publish the
//! deliveries with publisher confirms. `GetEvent` and `ListEvents` read events back.

mod batcher;
mod matcher;
mod service;

pub use matcher::SubscriptionMatcher;
pub use service::{IngestApi, IngestConfig};
