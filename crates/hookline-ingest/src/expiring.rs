//! The cache shape ingest uses twice (tenants' subscriptions, event-type schemas):
//! entries that expire after a time, can be dropped at once by a registry announcement,
//! and a generation counter so that a load that raced an invalidation is not cached.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Inner<K, V> {
    /// Bumped on every invalidation.
    generation: u64,
    entries: HashMap<K, (Instant, V)>,
}

pub(crate) struct Expiring<K, V> {
    ttl: Duration,
    /// Most entries; beyond it the cache starts afresh.
    max: usize,
    inner: Arc<Mutex<Inner<K, V>>>,
}

impl<K, V> Clone for Expiring<K, V> {
    fn clone(&self) -> Self {
        Self {
            ttl: self.ttl,
            max: self.max,
            inner: self.inner.clone(),
        }
    }
}

impl<K: Hash + Eq, V: Clone> Expiring<K, V> {
    pub(crate) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            inner: Arc::new(Mutex::new(Inner {
                generation: 0,
                entries: HashMap::new(),
            })),
        }
    }

    /// The entry if it is fresh; otherwise the generation to hand to [`Self::store`].
    pub(crate) fn fresh<Q>(&self, key: &Q) -> Result<V, u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.lock();
        match inner.entries.get(key) {
            Some((at, value)) if at.elapsed() < self.ttl => Ok(value.clone()),
            _ => Err(inner.generation),
        }
    }

    /// Keeps a loaded value, unless an invalidation happened since `generation`.
    pub(crate) fn store(&self, key: K, generation: u64, value: V) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.entries.len() >= self.max {
            inner.entries.clear();
        }
        inner.entries.insert(key, (Instant::now(), value));
    }

    pub(crate) fn invalidate<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.remove(key);
    }

    pub(crate) fn invalidate_all(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        // A poisoned lock only means another thread panicked mid-update; the cache is valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
