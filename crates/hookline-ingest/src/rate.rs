//! The events-per-second quota of each tenant, enforced by this ingest process.
//!
//! One token bucket per tenant (`governor`, a burst of one second's worth), rebuilt when
//! the tenant's quota changes. Every ingest process keeps its own buckets, so a cluster of
//! N ingest replicas admits up to N times the quota; the documentation says so.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota as Rate, RateLimiter};
use hookline_core::Id;
use hookline_core::quota::{Quota, QuotaExceeded, thousands};

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;
/// Each tenant's bucket, with the rate it was made for.
type Buckets = HashMap<Id, (u32, Arc<Bucket>)>;

/// Rates from this one up are not limited: far beyond what one process ingests, and
/// past a nanosecond per token the bucket would lose its precision.
const UNLIMITED_FROM: u32 = 1_000_000;

/// Most tenants with a bucket; beyond it every bucket starts afresh (full), which only
/// ever admits more, never refuses wrongly.
const MAX_TENANTS: usize = 100_000;

#[derive(Clone, Default)]
pub(crate) struct TenantRates {
    buckets: Arc<Mutex<Buckets>>,
}

impl TenantRates {
    /// Takes `events` from the tenant's bucket of `per_second`, or refuses them all.
    pub(crate) fn admit(
        &self,
        tenant: &Id,
        events: u32,
        per_second: u32,
    ) -> Result<(), QuotaExceeded> {
        let refuse = |context: String| QuotaExceeded {
            quota: Quota::EventsPerSecond,
            limit: per_second,
            tenant: tenant.to_string(),
            context,
        };
        let (Some(rate), Some(n)) = (NonZeroU32::new(per_second), NonZeroU32::new(events)) else {
            return Ok(());
        };
        if per_second >= UNLIMITED_FROM {
            return Ok(());
        }
        let bucket = self.bucket(tenant, rate);
        match bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(refuse(format!(
                "{} more events right now would publish faster than the tenant's rate; \
                 retry in a moment",
                thousands(u64::from(events))
            ))),
            Err(_) => Err(refuse(format!(
                "one call of {} events for one tenant is more than a second's worth; \
                 send smaller batches",
                thousands(u64::from(events))
            ))),
        }
    }

    fn bucket(&self, tenant: &Id, rate: NonZeroU32) -> Arc<Bucket> {
        // A poisoned lock only means another thread panicked mid-insert; the map is valid.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, b)) = buckets.get(tenant)
            && *r == rate.get()
        {
            return b.clone();
        }
        if buckets.len() >= MAX_TENANTS {
            buckets.clear();
        }
        let bucket = Arc::new(RateLimiter::direct(Rate::per_second(rate)));
        buckets.insert(tenant.clone(), (rate.get(), bucket.clone()));
        bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_core::IdKind;

    #[test]
    fn a_second_worth_passes_then_refuses_and_names_the_quota() {
        let rates = TenantRates::default();
        let t = Id::new(IdKind::Tenant);
        rates.admit(&t, 5, 5).unwrap();
        let e = rates.admit(&t, 1, 5).unwrap_err().to_string();
        assert!(e.contains("events per second is 5"), "{e}");
        assert!(e.contains("quota_events_per_second"), "{e}");
        // Another tenant has its own bucket.
        rates.admit(&Id::new(IdKind::Tenant), 5, 5).unwrap();
        // A batch larger than the burst can never pass.
        let e = rates.admit(&t, 6, 5).unwrap_err().to_string();
        assert!(e.contains("more than a second's worth"), "{e}");
    }

    #[test]
    fn the_largest_quota_admits_without_overflow() {
        let rates = TenantRates::default();
        let t = Id::new(IdKind::Tenant);
        for _ in 0..3 {
            rates.admit(&t, 1000, i32::MAX as u32).unwrap();
        }
        rates.admit(&t, 500, 999_999).unwrap();
    }

    #[test]
    fn a_new_quota_takes_effect_at_once() {
        let rates = TenantRates::default();
        let t = Id::new(IdKind::Tenant);
        rates.admit(&t, 2, 2).unwrap();
        assert!(rates.admit(&t, 1, 2).is_err());
        rates.admit(&t, 10, 10).unwrap();
    }
}
