//! The one cache shape for registry data ([`ChangeCache`]): `moka` for the bound (most
//! entries, evicted least-recently-used first rather than all at once) and the TTL, plus
//! a generation counter so a load that raced an invalidation never stays cached.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::future::Cache;

/// A bounded, expiring cache of registry data, invalidated by registry notices.
pub struct ChangeCache<K, V> {
    entries: Cache<K, V>,
    /// Bumped on every invalidation, before the entries are dropped.
    generation: Arc<AtomicU64>,
}

impl<K, V> Clone for ChangeCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            generation: self.generation.clone(),
        }
    }
}

impl<K, V> ChangeCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// At most `max_entries`, each trusted for `ttl` without hearing of a change.
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            generation: Arc::default(),
        }
    }

    /// The cached value of `key`, or `load`'s (cached unless an invalidation happened
    /// while it ran). Concurrent misses each load; for one load per key use
    /// [`Self::get_or_load_once`].
    pub async fn get_or_load<Q, E>(
        &self,
        key: &Q,
        load: impl Future<Output = Result<V, E>>,
    ) -> Result<V, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(value) = self.entries.get(key).await {
            return Ok(value);
        }
        let generation = self.generation();
        let value = load.await?;
        if self.generation() == generation {
            let key = key.to_owned();
            self.entries.insert(key.clone(), value.clone()).await;
            self.drop_if_raced(&key, generation).await;
        }
        Ok(value)
    }

    /// As [`Self::get_or_load`], but concurrent misses of one key share one load (its
    /// error shared too).
    pub async fn get_or_load_once<E>(
        &self,
        key: K,
        load: impl Future<Output = Result<V, E>>,
    ) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        let generation = self.generation();
        let value = self.entries.try_get_with(key.clone(), load).await?;
        self.drop_if_raced(&key, generation).await;
        Ok(value)
    }

    /// Drops `key`.
    pub async fn invalidate(&self, key: &K) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate(key).await;
    }

    /// Drops every entry `drop` picks.
    pub fn invalidate_if(&self, drop: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.entries.invalidate_entries_if(drop) {
            // Only when built without closures, which `new` never does; be safe anyway.
            tracing::warn!(error = %e, "cannot drop entries one by one; dropping all");
            self.entries.invalidate_all();
        }
    }

    /// Drops everything.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// An invalidation between a load's start and its insertion may have missed the
    /// entry (it was not there yet): drop it now, so stale data never stays.
    async fn drop_if_raced(&self, key: &K, generation: u64) {
        if self.generation() != generation {
            self.entries.invalidate(key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_load_that_raced_an_invalidation_is_not_kept() {
        let cache: ChangeCache<&str, u32> = ChangeCache::new(10, Duration::from_secs(60));
        let racing = cache.clone();
        let value = cache
            .get_or_load(&"k", async move {
                racing.invalidate(&"k").await;
                Ok::<_, ()>(1)
            })
            .await
            .unwrap();
        assert_eq!(value, 1, "the caller still gets what it loaded");
        let reloaded = cache.get_or_load(&"k", async { Ok::<_, ()>(2) }).await;
        assert_eq!(reloaded, Ok(2), "but it was not cached");
        let cached = cache.get_or_load(&"k", async { Ok::<_, ()>(3) }).await;
        assert_eq!(cached, Ok(2), "a quiet load is cached");
    }

    #[tokio::test]
    async fn shared_loads_obey_invalidations_too() {
        let cache: ChangeCache<&str, u32> = ChangeCache::new(10, Duration::from_secs(60));
        let racing = cache.clone();
        let value = cache
            .get_or_load_once("k", async move {
                racing.invalidate_all();
                Ok::<_, ()>(1)
            })
            .await
            .unwrap();
        assert_eq!(value, 1);
        let reloaded = cache.get_or_load_once("k", async { Ok::<_, ()>(2) }).await;
        assert_eq!(reloaded.unwrap(), 2, "the raced load was dropped");
        cache.invalidate_if(|_, v| *v == 2);
        let after = cache.get_or_load_once("k", async { Ok::<_, ()>(4) }).await;
        assert_eq!(after.unwrap(), 4, "dropped by a predicate");
    }

    #[tokio::test]
    async fn entries_expire() {
        let cache: ChangeCache<&str, u32> = ChangeCache::new(10, Duration::from_millis(30));
        cache
            .get_or_load(&"k", async { Ok::<_, ()>(1) })
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got = cache.get_or_load(&"k", async { Ok::<_, ()>(2) }).await;
            if got == Ok(2) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
