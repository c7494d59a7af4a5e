//! Turns per tenant, inside this process, for creates checked against a count quota.
//!
//! The store serialises the subscription creates of one tenant with a lock on the tenant
//! row, which is what keeps any number of processes within the quota. A call waiting for
//! that lock holds a database connection, though, so a burst of concurrent creates by one
//! tenant would fill the pool and starve every other tenant. Waiting here first, on one
//! of a fixed set of in-memory locks chosen by the tenant id, leaves the pool to others.

use std::hash::{BuildHasher, RandomState};

use hookline_core::Id;
use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 64;

pub(crate) struct TenantGate {
    hasher: RandomState,
    stripes: Vec<Mutex<()>>,
}

impl Default for TenantGate {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl TenantGate {
    /// Waits for this tenant's turn; the turn lasts as long as the guard.
    pub(crate) async fn turn(&self, tenant: &Id) -> MutexGuard<'_, ()> {
        let stripe = self.hasher.hash_one(tenant.as_str()) as usize % self.stripes.len();
        self.stripes[stripe].lock().await
    }
}
