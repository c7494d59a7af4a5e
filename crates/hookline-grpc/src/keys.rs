//! Limits per API key, so one key cannot crowd out the others: a request rate (GCRA via
//! `governor`, answered `RESOURCE_EXHAUSTED` with the time to wait in a `RetryInfo`
//! detail) and a cap on open `WatchDeliveries` streams (a stream also ends when its key is
//! revoked or its tenant deleted: [`crate::auth::guard_stream`]). The rate's per-key state
//! is pruned by a background task, never inside a request.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hookline_core::Id;
use tonic::Status;

use crate::principal::Principal;

/// The per-key limits; see the `key_*` settings.
#[derive(Debug, Clone)]
pub struct KeyLimitsConfig {
    /// Requests per second one key may make (its burst is one second's worth); 0: no limit.
    pub requests_per_second: u32,
    /// `WatchDeliveries` streams one key may hold open at once.
    pub max_watch_streams: usize,
}

impl Default for KeyLimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 5_000,
            max_watch_streams: 16,
        }
    }
}

/// How often the rate limiter forgets keys that are back to a full burst.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The state behind [`KeyLimitsConfig`], shared by every service of the process.
pub struct KeyLimits {
    config: KeyLimitsConfig,
    rate: Option<Arc<DefaultKeyedRateLimiter<Id>>>,
    /// Open streams per key.
    streams: Arc<Mutex<HashMap<Id, usize>>>,
}

impl KeyLimits {
    pub fn new(config: KeyLimitsConfig) -> Self {
        let rate = NonZeroU32::new(config.requests_per_second)
            .map(|per_second| Arc::new(RateLimiter::keyed(Quota::per_second(per_second))));
        if let Some(rate) = &rate {
            spawn_pruning(Arc::downgrade(rate), PRUNE_EVERY);
        }
        Self {
            config,
            rate,
            streams: Arc::default(),
        }
    }

    /// Counts one request of `principal`'s key; over the rate, `RESOURCE_EXHAUSTED` with
    /// the time to wait.
    pub fn check_rate(&self, principal: &Principal) -> Result<(), Status> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check_key(principal.key_id()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let wait = wait.max(Duration::from_millis(1));
            crate::status::exhausted_retry_in(
                format!(
                    "API key {} is over its limit of {} requests per second; retry in {} ms \
                     (setting key_requests_per_second)",
                    principal.key_id(),
                    self.config.requests_per_second,
                    wait.as_millis()
                ),
                wait,
            )
        })
    }

    /// Reserves one open stream for `principal`'s key, released when the permit drops;
    /// `RESOURCE_EXHAUSTED` when the key already holds the most allowed.
    pub fn open_stream(&self, principal: &Principal) -> Result<StreamPermit, Status> {
        let key = principal.key_id().clone();
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| Status::internal("stream registry lock poisoned"))?;
        let open = streams.entry(key.clone()).or_default();
        if *open >= self.config.max_watch_streams {
            return Err(Status::resource_exhausted(format!(
                "API key {key} already has {open} open WatchDeliveries streams; the limit is {} \
                 (setting key_max_watch_streams); close one first",
                self.config.max_watch_streams
            )));
        }
        *open += 1;
        Ok(StreamPermit {
            key,
            streams: self.streams.clone(),
        })
    }
}

/// Every `every`, drops the rate state of keys back to a full burst (a key unseen for a
/// second is indistinguishable from a new one), so the map holds only recent callers.
/// Ends when the limiter is dropped; without a tokio runtime (plain unit tests) nothing
/// is spawned.
fn spawn_pruning(rate: std::sync::Weak<DefaultKeyedRateLimiter<Id>>, every: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(rate) = rate.upgrade() else { return };
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    });
}

/// One open stream of a key; dropping it frees the slot.
pub struct StreamPermit {
    key: Id,
    streams: Arc<Mutex<HashMap<Id, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Ok(mut streams) = self.streams.lock()
            && let Some(open) = streams.get_mut(&self.key)
        {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_core::IdKind;
    use tonic::Code;
    use tonic_types::StatusExt;

    fn tenant_key() -> Principal {
        Principal::Tenant {
            key_id: Id::new(IdKind::ApiKey),
            tenant_id: Id::new(IdKind::Tenant),
        }
    }

    #[test]
    fn the_rate_is_per_key_and_says_how_long_to_wait() {
        let limits = KeyLimits::new(KeyLimitsConfig {
            requests_per_second: 3,
            max_watch_streams: 1,
        });
        let (a, b) = (tenant_key(), tenant_key());
        for _ in 0..3 {
            limits.check_rate(&a).expect("within the burst");
        }
        let refused = limits.check_rate(&a).expect_err("over the rate");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let wait = refused
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .expect("RetryInfo with a delay");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        limits.check_rate(&b).expect("another key has its own rate");
    }

    #[tokio::test]
    async fn keys_back_to_a_full_burst_are_pruned_outside_requests() {
        let limits = KeyLimits::new(KeyLimitsConfig {
            requests_per_second: 1_000,
            max_watch_streams: 1,
        });
        for _ in 0..50 {
            limits.check_rate(&tenant_key()).expect("within the rate");
        }
        let rate = limits.rate.clone().expect("a rate is set");
        assert_eq!(rate.len(), 50);
        spawn_pruning(Arc::downgrade(&rate), Duration::from_millis(20));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !rate.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rate.len(), 0, "the pruning task forgot the idle keys");
    }

    #[test]
    fn no_rate_when_zero() {
        let limits = KeyLimits::new(KeyLimitsConfig {
            requests_per_second: 0,
            max_watch_streams: 1,
        });
        let key = tenant_key();
        for _ in 0..10_000 {
            limits.check_rate(&key).expect("no limit");
        }
    }

    #[test]
    fn stream_slots_are_per_key_and_freed_on_drop() {
        let limits = KeyLimits::new(KeyLimitsConfig {
            requests_per_second: 0,
            max_watch_streams: 2,
        });
        let (a, b) = (tenant_key(), tenant_key());
        let first = limits.open_stream(&a).unwrap();
        let _second = limits.open_stream(&a).unwrap();
        let refused = limits.open_stream(&a).err().expect("third refused");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let _other = limits
            .open_stream(&b)
            .expect("another key has its own slots");
        drop(first);
        limits
            .open_stream(&a)
            .expect("a dropped stream frees its slot");
    }
}
