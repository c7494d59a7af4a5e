//! Which subscriptions want an event, without a database read per publish.
//!
//! The enabled subscriptions of a tenant are cached (a bounded [`ChangeCache`]), read
//! through the storage port on a miss. A registry change heard on the process's change
//! stream drops the tenant's entry at once (a `Resync` drops everything), so a new or
//! disabled subscription takes effect as soon as the announcement arrives; entries also
//! expire after a short time as a safety net. The
//! tenant's quotas come with its entry, and the matcher also keeps the event-type schema
//! cache fresh from the same announcements.

use std::sync::Arc;
use std::time::Duration;

use hookline_changes::{ChangeCache, RegistryChanges, RegistryNotice};
use hookline_core::Id;
use hookline_core::filter::subscription_wants;
use hookline_core::model::{RegistryChange, Subscription};
use hookline_core::quota::TenantQuotas;
use hookline_store::StoreError;
use hookline_store::port::RegistryStore;
use tokio_util::sync::CancellationToken;

use crate::schemas::SchemaCache;

const TTL: Duration = Duration::from_secs(30);
const MAX_TENANTS: u64 = 100_000;

/// A tenant as the matcher knows it.
#[derive(Debug)]
pub enum TenantSubscriptions {
    Missing,
    Present {
        quotas: TenantQuotas,
        subscriptions: Vec<Subscription>,
    },
}

impl TenantSubscriptions {
    /// The ids of the subscriptions that want an event, with the tenant's quotas; `None`
    /// if the tenant is unknown.
    pub fn matching(&self, event_type: &str, channels: &[String]) -> Option<Matched> {
        match self {
            TenantSubscriptions::Missing => None,
            TenantSubscriptions::Present {
                quotas,
                subscriptions,
            } => Some(Matched {
                quotas: *quotas,
                subscription_ids: subscriptions
                    .iter()
                    .filter(|s| {
                        subscription_wants(&s.event_types, &s.channels, event_type, channels)
                    })
                    .map(|s| s.id.clone())
                    .collect(),
            }),
        }
    }
}

/// The subscriptions that want an event, and the quotas of their tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub quotas: TenantQuotas,
    pub subscription_ids: Vec<Id>,
}

#[derive(Clone)]
pub struct SubscriptionMatcher {
    registry: Arc<dyn RegistryStore>,
    cache: ChangeCache<Id, Arc<TenantSubscriptions>>,
    schemas: SchemaCache,
}

impl SubscriptionMatcher {
    pub fn new(registry: Arc<dyn RegistryStore>) -> Self {
        Self {
            schemas: SchemaCache::new(registry.clone()),
            registry,
            cache: ChangeCache::new(MAX_TENANTS, TTL),
        }
    }

    /// The event-type schemas, kept fresh by the same announcements.
    pub(crate) fn schemas(&self) -> &SchemaCache {
        &self.schemas
    }

    /// The tenant's enabled subscriptions, from the cache or the store.
    pub async fn tenant(&self, tenant_id: &Id) -> Result<Arc<TenantSubscriptions>, StoreError> {
        self.cache
            .get_or_load(tenant_id, self.load(tenant_id))
            .await
    }

    async fn load(&self, tenant_id: &Id) -> Result<Arc<TenantSubscriptions>, StoreError> {
        let loaded = match self.registry.get_tenant(tenant_id).await {
            Ok(tenant) => TenantSubscriptions::Present {
                quotas: tenant.quotas,
                subscriptions: self.registry.enabled_subscriptions(tenant_id).await?,
            },
            Err(StoreError::NotFound { .. }) => TenantSubscriptions::Missing,
            Err(e) => return Err(e),
        };
        Ok(Arc::new(loaded))
    }

    pub async fn invalidate_tenant(&self, tenant_id: &Id) {
        self.cache.invalidate(tenant_id).await;
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.schemas.invalidate_all();
    }

    /// Applies one notice of the registry change stream.
    pub async fn apply(&self, notice: &RegistryNotice) {
        match notice {
            RegistryNotice::Resync => self.invalidate_all(),
            RegistryNotice::Change(
                RegistryChange::Tenant { tenant_id }
                | RegistryChange::Subscription { tenant_id, .. },
            ) => self.invalidate_tenant(tenant_id).await,
            RegistryNotice::Change(RegistryChange::EventType { name }) => {
                self.schemas.invalidate(name).await
            }
            RegistryNotice::Change(RegistryChange::ApiKey { .. }) => {}
        }
    }

    /// Applies the notices of `changes` until `shutdown`.
    pub fn follow(
        &self,
        changes: &RegistryChanges,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let matcher = self.clone();
        changes.spawn_follower(shutdown, move |notice| {
            let matcher = matcher.clone();
            async move { matcher.apply(&notice).await }
        })
    }
}
