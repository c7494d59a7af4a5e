//! What keeps every cache of a process in step with the registry, in one place.
//!
//! The registry (and the dispatcher, when an endpoint answers 410 Gone) commits a change
//! and then [`announce`]s it as a typed [`RegistryChange`]. Each process follows the
//! broker's change subscription once ([`RegistryChanges::follow`]) and fans it out to
//! its caches as a stream of [`RegistryNotice`]: `Change` or `Resync` (changes may have
//! been missed: a reconnection, an unreadable announcement, a follower that fell
//! behind). The caches are [`ChangeCache`]s: bounded in size, expiring after a TTL (the
//! safety net for a lost announcement), and never keeping a load that raced an
//! invalidation.
//!
//! [`RegistryChange`]: hookline_core::model::RegistryChange

mod cache;
mod stream;

pub use cache::ChangeCache;
pub use stream::{RegistryChanges, RegistryNotice, RegistryStream, announce};
