//! The registry port with secrets sealed at rest: a decorator over any [`RegistryStore`]
//! that seals signing secrets and custom header values on their way into storage and
//! opens them on their way out, so every reader (dispatcher signing, `GetSecret`,
//! rotation) holds plaintext in memory only and the adapters stay unaware of sealing.
//!
//! A new secret field is sealed by one line in [`seal_subscription`]/[`open_subscription`]
//! (or the `NewSubscription` equivalent) and one entry in
//! [`crate::sealing::SEALED_COLUMNS`], which the start-up sealing and the key rotation walk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::client_cert::ClientIdentity;
use hookline_core::model::{
    ApiKey, EventType, Subscription, SubscriptionSecret, SubscriptionState, Tenant,
};
use hookline_core::quota::TenantQuotas;
use hookline_seal::Keyring;

use crate::StoreError;
use crate::port::{NewApiKey, NewSubscription, Page, PageRequest, RegistryStore};

/// [`RegistryStore`] over `inner`, sealing under `keyring`.
pub struct SealedRegistry {
    inner: Arc<dyn RegistryStore>,
    keyring: Arc<Keyring>,
}

impl SealedRegistry {
    pub fn new(inner: Arc<dyn RegistryStore>, keyring: Arc<Keyring>) -> Self {
        Self { inner, keyring }
    }

    fn open(&self, stored: &str) -> Result<String, StoreError> {
        self.keyring
            .open(stored)
            .map_err(|e| StoreError::Internal(format!("cannot open a sealed value: {e}")))
    }

    fn seal_headers(&self, headers: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        headers
            .iter()
            .map(|(k, v)| (k.clone(), self.keyring.seal(v)))
            .collect()
    }

    fn open_headers(
        &self,
        headers: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, StoreError> {
        headers
            .into_iter()
            .map(|(k, v)| Ok((k, self.open(&v)?)))
            .collect()
    }

    fn seal_secret(&self, secret: &SubscriptionSecret) -> SubscriptionSecret {
        SubscriptionSecret {
            secret: self.keyring.seal(&secret.secret),
            ..secret.clone()
        }
    }

    fn open_secret(
        &self,
        mut secret: SubscriptionSecret,
    ) -> Result<SubscriptionSecret, StoreError> {
        secret.secret = self.open(&secret.secret)?;
        Ok(secret)
    }

    /// The stored form of a client certificate: its private key sealed.
    fn seal_identity(&self, identity: &ClientIdentity) -> ClientIdentity {
        ClientIdentity {
            certificate_pem: identity.certificate_pem.clone(),
            private_key_pem: self.keyring.seal(&identity.private_key_pem),
        }
    }

    fn open_identity(&self, mut identity: ClientIdentity) -> Result<ClientIdentity, StoreError> {
        identity.private_key_pem = self.open(&identity.private_key_pem)?;
        Ok(identity)
    }

    /// The stored form of a subscription's secret fields.
    fn seal_subscription(&self, mut sub: Subscription) -> Subscription {
        sub.headers = self.seal_headers(&sub.headers);
        sub
    }

    /// The plaintext of a stored subscription's secret fields.
    fn open_subscription(&self, mut sub: Subscription) -> Result<Subscription, StoreError> {
        sub.headers = self.open_headers(sub.headers)?;
        Ok(sub)
    }

    fn open_all(&self, subs: Vec<Subscription>) -> Result<Vec<Subscription>, StoreError> {
        subs.into_iter()
            .map(|s| self.open_subscription(s))
            .collect()
    }
}

#[async_trait]
impl RegistryStore for SealedRegistry {
    async fn create_tenant(
        &self,
        id: &Id,
        name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Tenant, StoreError> {
        self.inner.create_tenant(id, name, metadata).await
    }
    async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError> {
        self.inner.get_tenant(id).await
    }
    async fn list_tenants(&self, page: &PageRequest) -> Result<Page<Tenant>, StoreError> {
        self.inner.list_tenants(page).await
    }
    async fn update_tenant(
        &self,
        id: &Id,
        name: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Tenant, StoreError> {
        self.inner.update_tenant(id, name, metadata).await
    }
    async fn delete_tenant(&self, id: &Id) -> Result<(), StoreError> {
        self.inner.delete_tenant(id).await
    }
    async fn set_tenant_quotas(
        &self,
        id: &Id,
        quotas: &TenantQuotas,
    ) -> Result<Tenant, StoreError> {
        self.inner.set_tenant_quotas(id, quotas).await
    }

    async fn create_subscription_within(
        &self,
        new: &NewSubscription,
        default_limit: u32,
    ) -> Result<Subscription, StoreError> {
        let sealed = NewSubscription {
            headers: self.seal_headers(&new.headers),
            secret: self.seal_secret(&new.secret),
            client_identity: new.client_identity.as_ref().map(|c| self.seal_identity(c)),
            ..new.clone()
        };
        let created = self
            .inner
            .create_subscription_within(&sealed, default_limit)
            .await?;
        self.open_subscription(created)
    }
    async fn get_subscription(&self, id: &Id) -> Result<Subscription, StoreError> {
        self.open_subscription(self.inner.get_subscription(id).await?)
    }
    async fn list_subscriptions(
        &self,
        tenant_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Subscription>, StoreError> {
        let page = self.inner.list_subscriptions(tenant_id, page).await?;
        Ok(Page {
            items: self.open_all(page.items)?,
            next_cursor: page.next_cursor,
        })
    }
    async fn update_subscription(&self, sub: &Subscription) -> Result<Subscription, StoreError> {
        let sealed = self.seal_subscription(sub.clone());
        self.open_subscription(self.inner.update_subscription(&sealed).await?)
    }
    async fn delete_subscription(&self, id: &Id) -> Result<(), StoreError> {
        self.inner.delete_subscription(id).await
    }
    async fn set_subscription_state(
        &self,
        id: &Id,
        state: SubscriptionState,
        reason: Option<&str>,
    ) -> Result<Subscription, StoreError> {
        self.open_subscription(self.inner.set_subscription_state(id, state, reason).await?)
    }
    async fn enabled_subscriptions(&self, tenant_id: &Id) -> Result<Vec<Subscription>, StoreError> {
        self.open_all(self.inner.enabled_subscriptions(tenant_id).await?)
    }

    async fn live_secrets(
        &self,
        subscription_id: &Id,
        now: DateTime<Utc>,
    ) -> Result<Vec<SubscriptionSecret>, StoreError> {
        self.inner
            .live_secrets(subscription_id, now)
            .await?
            .into_iter()
            .map(|s| self.open_secret(s))
            .collect()
    }
    async fn rotate_secret(
        &self,
        new: &SubscriptionSecret,
        old_expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner
            .rotate_secret(&self.seal_secret(new), old_expires_at)
            .await
    }

    async fn create_event_type(
        &self,
        name: &str,
        description: &str,
        schema: Option<&str>,
    ) -> Result<EventType, StoreError> {
        self.inner
            .create_event_type(name, description, schema)
            .await
    }
    async fn get_event_type(&self, name: &str) -> Result<EventType, StoreError> {
        self.inner.get_event_type(name).await
    }
    async fn list_event_types(
        &self,
        include_archived: bool,
        page: &PageRequest,
    ) -> Result<Page<EventType>, StoreError> {
        self.inner.list_event_types(include_archived, page).await
    }
    async fn update_event_type(
        &self,
        name: &str,
        description: Option<&str>,
        schema: Option<Option<&str>>,
        archived: Option<bool>,
    ) -> Result<EventType, StoreError> {
        self.inner
            .update_event_type(name, description, schema, archived)
            .await
    }
    async fn delete_event_type(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete_event_type(name).await
    }

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError> {
        self.inner.create_api_key(new).await
    }
    async fn find_api_key_by_hash(&self, token_hash: &[u8; 32]) -> Result<ApiKey, StoreError> {
        self.inner.find_api_key_by_hash(token_hash).await
    }
    async fn list_api_keys(
        &self,
        tenant_id: Option<&Id>,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        self.inner.list_api_keys(tenant_id, page).await
    }
    async fn get_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        self.inner.get_api_key(id).await
    }
    async fn revoke_api_key(&self, id: &Id) -> Result<ApiKey, StoreError> {
        self.inner.revoke_api_key(id).await
    }

    async fn set_circuit_open_until(
        &self,
        id: &Id,
        until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        self.inner.set_circuit_open_until(id, until).await
    }
    async fn circuit_open_until(&self, id: &Id) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.inner.circuit_open_until(id).await
    }

    async fn set_client_identity(
        &self,
        id: &Id,
        identity: Option<&ClientIdentity>,
    ) -> Result<(), StoreError> {
        let sealed = identity.map(|c| self.seal_identity(c));
        self.inner.set_client_identity(id, sealed.as_ref()).await
    }

    async fn client_identities(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, ClientIdentity>, StoreError> {
        let stored = self.inner.client_identities(ids).await?;
        stored
            .into_iter()
            .map(|(id, c)| Ok((id, self.open_identity(c)?)))
            .collect()
    }

    async fn current_secrets(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, SubscriptionSecret>, StoreError> {
        let stored = self.inner.current_secrets(ids).await?;
        stored
            .into_iter()
            .map(|(id, s)| Ok((id, self.open_secret(s)?)))
            .collect()
    }
}
