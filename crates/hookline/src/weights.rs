//! Tenant weights for the shard router (fair delivery): read from the registry once per
//! tenant, cached, and dropped when the tenant changes, so every publisher of the process
//! (ingest, relay, retry scheduler, manual retry) routes a tenant by its current weight.

use std::sync::Arc;
use std::time::Duration;

use hookline_broker::shards::TenantWeights;
use hookline_changes::{ChangeCache, RegistryChanges, RegistryNotice};
use hookline_core::model::RegistryChange;
use hookline_core::{Id, IdKind};
use hookline_store::port::RegistryStore;
use tokio_util::sync::CancellationToken;

/// Most tenants whose weight is cached.
const MAX_ENTRIES: u64 = 100_000;
/// How long a weight is trusted without hearing of a change.
const TTL: Duration = Duration::from_secs(60);

/// The weights of tenants, cached; share it as `Arc<WeightCache>`.
#[derive(Clone)]
pub struct WeightCache {
    registry: Arc<dyn RegistryStore>,
    cache: ChangeCache<String, u32>,
}

impl WeightCache {
    pub fn new(registry: Arc<dyn RegistryStore>) -> Self {
        Self {
            registry,
            cache: ChangeCache::new(MAX_ENTRIES, TTL),
        }
    }

    /// Drops a tenant's weight when it changes (everything on a resync).
    pub fn follow(
        &self,
        changes: &RegistryChanges,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.cache.clone();
        changes.spawn_follower(shutdown, move |notice| {
            let cache = cache.clone();
            async move {
                match notice {
                    RegistryNotice::Change(RegistryChange::Tenant { tenant_id }) => {
                        cache.invalidate(&tenant_id.into_string()).await;
                    }
                    RegistryNotice::Change(_) => {}
                    RegistryNotice::Resync => cache.invalidate_all(),
                }
            }
        })
    }
}

#[tonic::async_trait]
impl TenantWeights for WeightCache {
    async fn weight(&self, tenant: &str) -> u32 {
        let Ok(id) = Id::parse(IdKind::Tenant, "tenant_id", tenant) else {
            return 1;
        };
        let load = async {
            let tenant = self.registry.get_tenant(&id).await?;
            Ok::<_, hookline_store::StoreError>(tenant.quotas.weight.unwrap_or(1))
        };
        match self.cache.get_or_load(tenant, load).await {
            Ok(weight) => weight,
            Err(error) => {
                tracing::debug!(%error, tenant_id = tenant, "cannot read the tenant's weight; routing it as weight 1");
                1
            }
        }
    }
}
