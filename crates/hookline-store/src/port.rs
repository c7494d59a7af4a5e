//! The storage port: what the services need from a database, as traits.
//!
//! Services depend on these traits only, so the PostgreSQL adapter (clusters) and the
//! SQLite adapter (embedded mode) are interchangeable without touching service code.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::model::{
    ApiKey, EventType, Subscription, SubscriptionSecret, SubscriptionState, Tenant,
};

use crate::StoreError;

/// A page of results and the cursor of the next page (`None` on the last page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Where a list starts and how long it is. `after` is the opaque cursor of the previous page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: u32,
}

/// A new subscription; the store stamps `created_at`/`updated_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubscription {
    pub id: Id,
    pub tenant_id: Id,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub channels: Vec<String>,
    pub headers: BTreeMap<String, String>,
    pub rate_limit_per_second: Option<u32>,
    pub max_in_flight: Option<u32>,
    pub retry_schedule: Option<Vec<Duration>>,
    pub state: SubscriptionState,
    pub metadata: BTreeMap<String, String>,
    /// The first signing secret.
    pub secret: SubscriptionSecret,
}

/// A new API key: only the SHA-256 of its token reaches the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub id: Id,
    pub name: String,
    pub tenant_id: Option<Id>,
    pub token_prefix: String,
    pub token_hash: [u8; 32],
}

/// Tenants, subscriptions, secrets, event types and API keys: the control plane's state.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    async fn create_tenant(
        &self,
        id: &Id,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Tenant, StoreError>;
    async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError>;
    /// Tenants in id (creation) order.
    async fn list_tenants(&self, page: &PageRequest) -> Result<Page<Tenant>, StoreError>;
    async fn update_tenant(
        &self,
        id: &Id,
        name: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Tenant, StoreError>;
    /// Deletes the tenant and everything that belongs to it.
    async fn delete_tenant(&self, id: &Id) -> Result<(), StoreError>;

    async fn create_subscription(&self, new: &NewSubscription) -> Result<Subscription, StoreError>;
    async fn get_subscription(&self, id: &Id) -> Result<Subscription, StoreError>;
    /// Subscriptions of one tenant in id (creation) order.
    async fn list_subscriptions(
        &self,
        tenant_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Subscription>, StoreError>;
    /// Replaces every mutable field with the values in `sub` (id, tenant and timestamps are
    /// kept) and returns the stored row.
    async fn update_subscription(&self, sub: &Subscription) -> Result<Subscription, StoreError>;
    async fn delete_subscription(&self, id: &Id) -> Result<(), StoreError>;
    /// Every enabled subscription of a tenant; the caller applies filters and channels.
    async fn enabled_subscriptions(&self, tenant_id: &Id) -> Result<Vec<Subscription>, StoreError>;

    /// Secrets still in use (current, or rotated out but not yet expired at `now`), newest first.
    async fn live_secrets(
        &self,
        subscription_id: &Id,
        now: DateTime<Utc>,
    ) -> Result<Vec<SubscriptionSecret>, StoreError>;
    /// Makes `new` the current secret; the previous current one expires at `old_expires_at`.
    async fn rotate_secret(
        &self,
        new: &SubscriptionSecret,
        old_expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    async fn create_event_type(
        &self,
        name: &str,
        description: &str,
        schema: Option<&str>,
    ) -> Result<EventType, StoreError>;
    async fn get_event_type(&self, name: &str) -> Result<EventType, StoreError>;
    /// Event types in name order; the cursor is the last name.
    async fn list_event_types(
        &self,
        include_archived: bool,
        page: &PageRequest,
    ) -> Result<Page<EventType>, StoreError>;
    async fn update_event_type(
        &self,
        name: &str,
        description: Option<&str>,
        schema: Option<Option<&str>>,
        archived: Option<bool>,
    ) -> Result<EventType, StoreError>;
    async fn delete_event_type(&self, name: &str) -> Result<(), StoreError>;

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError>;
    /// The live (not revoked) key whose token hashes to `token_hash`.
    async fn find_api_key_by_hash(&self, token_hash: &[u8; 32]) -> Result<ApiKey, StoreError>;
    /// Keys of one tenant, or the admin keys when `tenant_id` is `None`; in id order.
    async fn list_api_keys(
        &self,
        tenant_id: Option<&Id>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError>;
    async fn get_api_key(&self, id: &Id) -> Result<ApiKey, StoreError>;
    async fn revoke_api_key(&self, id: &Id) -> Result<ApiKey, StoreError>;
}

/// Liveness of the backing database, for `/readyz`.
#[async_trait]
pub trait StoreHealth: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), StoreError>;
}
