//! Subscriptions as the dispatcher needs them, without a database read per delivery.
//!
//! An entry holds the subscription, its parsed URL, the headers every request to it
//! carries, its retry policy, the decoded signing keys of its live secrets and its client
//! certificate. It is
//! read through the registry port on a miss (one load per subscription even when many
//! deliveries miss at once), dropped when the change stream brings a change of the
//! subscription or its tenant, dropped wholesale on a `Resync`, and expires after
//! [`TTL`] as a safety net for a lost announcement; at most [`MAX_ENTRIES`] are kept
//! (a bounded [`ChangeCache`]). A rotated-out secret stops signing at its `expires_at`
//! even while its entry is cached.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_changes::{ChangeCache, RegistryChanges, RegistryNotice};
use hookline_core::Id;
use hookline_core::client_cert::ClientIdentity;
use hookline_core::model::{RegistryChange, Subscription};
use hookline_core::retry::RetryPolicy;
use hookline_core::signing::SigningKey;
use hookline_core::validate;
use hookline_store::StoreError;
use hookline_store::port::RegistryStore;
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use tokio_util::sync::CancellationToken;

/// How long an entry is trusted without hearing of a change.
pub(crate) const TTL: Duration = Duration::from_secs(60);
/// The most entries kept (least recently used evicted first).
const MAX_ENTRIES: u64 = 100_000;

/// A subscription ready to be delivered to.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) subscription: Subscription,
    /// The URL, or why it cannot be requested.
    pub(crate) url: Result<Url, String>,
    /// The subscription's extra headers plus `content-type` and `user-agent`.
    pub(crate) headers: HeaderMap,
    pub(crate) policy: RetryPolicy,
    /// Decoded keys of the secrets live when the entry was loaded, with their expiry.
    keys: Vec<(SigningKey, Option<DateTime<Utc>>)>,
    /// The client certificate presented to the receiver; `None`: the default one.
    pub(crate) identity: Option<ClientIdentity>,
}

impl Endpoint {
    fn new(
        subscription: Subscription,
        keys: Vec<(SigningKey, Option<DateTime<Utc>>)>,
        user_agent: &HeaderValue,
    ) -> Self {
        let mut headers = HeaderMap::with_capacity(subscription.headers.len() + 2);
        for (name, value) in &subscription.headers {
            // The create-time rule again, for headers stored before it existed; the log
            // line repeats a bounded excerpt of the name, never all of it.
            match (
                validate::header_name("headers", name),
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(()), Ok(n), Ok(v)) => {
                    headers.insert(n, v);
                }
                _ => tracing::warn!(
                    subscription_id = %subscription.id,
                    header = %validate::excerpt(name),
                    "skipping an extra header that is not valid HTTP or not allowed"
                ),
            }
        }
        // Ours last, so an extra header can never replace them.
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, user_agent.clone());
        let url = Url::parse(&subscription.url).map_err(|e| {
            format!(
                "the subscription URL {:?} is not valid: {e}",
                subscription.url
            )
        });
        let policy = RetryPolicy::from_schedule(subscription.retry_schedule.as_deref());
        Self {
            subscription,
            url,
            headers,
            policy,
            keys,
            identity: None,
        }
    }

    /// The keys that sign at `now`: every live secret not yet past its `expires_at`.
    pub(crate) fn keys_at(&self, now: DateTime<Utc>) -> Vec<SigningKey> {
        self.keys
            .iter()
            .filter(|(_, expires_at)| expires_at.is_none_or(|at| at > now))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// What the cache knows of a subscription.
#[derive(Debug, Clone)]
pub(crate) enum Lookup {
    Found(Arc<Endpoint>),
    /// It does not exist (deleted; its deliveries went with it).
    Gone,
}

/// An entry: the lookup, and the tenant it belongs to (for a tenant's changes).
#[derive(Clone)]
struct Slot {
    tenant_id: Id,
    lookup: Lookup,
}

/// The subscription cache, shared by every delivery task.
pub(crate) struct SubscriptionCache {
    registry: Arc<dyn RegistryStore>,
    user_agent: HeaderValue,
    slots: ChangeCache<Id, Slot>,
}

impl SubscriptionCache {
    pub(crate) fn new(registry: Arc<dyn RegistryStore>, user_agent: HeaderValue) -> Self {
        Self {
            registry,
            user_agent,
            slots: ChangeCache::new(MAX_ENTRIES, TTL),
        }
    }

    /// The subscription, from the cache or (on a miss) the registry store. Concurrent
    /// misses share one load; a load that races an invalidation is not kept.
    pub(crate) async fn get(
        &self,
        tenant_id: &Id,
        subscription_id: &Id,
    ) -> Result<Lookup, Arc<StoreError>> {
        let load = async {
            Ok(Slot {
                tenant_id: tenant_id.clone(),
                lookup: self.load(subscription_id).await?,
            })
        };
        let slot = self
            .slots
            .get_or_load_once(subscription_id.clone(), load)
            .await?;
        Ok(slot.lookup)
    }

    async fn load(&self, subscription_id: &Id) -> Result<Lookup, StoreError> {
        let subscription = match self.registry.get_subscription(subscription_id).await {
            Ok(s) => s,
            Err(StoreError::NotFound { .. }) => return Ok(Lookup::Gone),
            Err(e) => return Err(e),
        };
        let secrets = self
            .registry
            .live_secrets(subscription_id, Utc::now())
            .await?;
        let keys = secrets
            .iter()
            .filter_map(|s| match SigningKey::from_secret(&s.secret) {
                Ok(key) => Some((key, s.expires_at)),
                Err(e) => {
                    tracing::warn!(%subscription_id, secret_id = %s.id, error = %e, "skipping a secret that cannot be decoded");
                    None
                }
            })
            .collect();
        let mut endpoint = Endpoint::new(subscription, keys, &self.user_agent);
        endpoint.identity = self
            .registry
            .client_identities(std::slice::from_ref(subscription_id))
            .await?
            .remove(subscription_id);
        Ok(Lookup::Found(Arc::new(endpoint)))
    }

    pub(crate) async fn invalidate_subscription(&self, subscription_id: &Id) {
        self.slots.invalidate(subscription_id).await;
    }

    pub(crate) fn invalidate_tenant(&self, tenant_id: &Id) {
        let tenant_id = tenant_id.clone();
        self.slots
            .invalidate_if(move |_, slot| slot.tenant_id == tenant_id);
    }

    /// Applies one notice of the registry change stream.
    pub(crate) async fn apply(&self, notice: &RegistryNotice) {
        match notice {
            RegistryNotice::Resync => self.slots.invalidate_all(),
            RegistryNotice::Change(RegistryChange::Subscription {
                subscription_id, ..
            }) => self.invalidate_subscription(subscription_id).await,
            RegistryNotice::Change(RegistryChange::Tenant { tenant_id }) => {
                self.invalidate_tenant(tenant_id)
            }
            RegistryNotice::Change(
                RegistryChange::ApiKey { .. } | RegistryChange::EventType { .. },
            ) => {}
        }
    }

    /// Applies the notices of `changes` until `shutdown`.
    pub(crate) fn follow(
        self: Arc<Self>,
        changes: &RegistryChanges,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        changes.spawn_follower(shutdown, move |notice| {
            let cache = self.clone();
            async move { cache.apply(&notice).await }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_core::IdKind;
    use hookline_core::model::SubscriptionState;
    use hookline_core::signing::generate_secret;
    use std::collections::BTreeMap;

    fn subscription(url: &str, headers: &[(&str, &str)]) -> Subscription {
        Subscription {
            id: Id::new(IdKind::Subscription),
            tenant_id: Id::new(IdKind::Tenant),
            url: url.into(),
            description: String::new(),
            event_types: vec![],
            channels: vec![],
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            rate_limit_per_second: None,
            max_in_flight: None,
            retry_schedule: None,
            state: SubscriptionState::Enabled,
            disabled_reason: None,
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            payload_format: Default::default(),
            ordering: Default::default(),
        }
    }

    #[test]
    fn expired_keys_stop_signing() {
        let now = Utc::now();
        let key = |s: &str| SigningKey::from_secret(s).unwrap();
        let endpoint = Endpoint::new(
            subscription("https://example.com/hook", &[]),
            vec![
                (key(&generate_secret()), None),
                (
                    key(&generate_secret()),
                    Some(now + chrono::Duration::seconds(10)),
                ),
            ],
            &HeaderValue::from_static("Hookline/test"),
        );
        assert_eq!(endpoint.keys_at(now).len(), 2);
        assert_eq!(
            endpoint.keys_at(now + chrono::Duration::seconds(10)).len(),
            1
        );
    }

    #[test]
    fn extra_headers_never_replace_ours_and_bad_ones_are_skipped() {
        let endpoint = Endpoint::new(
            subscription(
                "not a url",
                &[
                    ("x-team", "billing"),
                    ("content-type", "text/plain"),
                    ("bad header", "x"),
                ],
            ),
            vec![],
            &HeaderValue::from_static("Hookline/test"),
        );
        assert_eq!(endpoint.headers["x-team"], "billing");
        assert_eq!(endpoint.headers[CONTENT_TYPE], "application/json");
        assert_eq!(endpoint.headers[USER_AGENT], "Hookline/test");
        assert_eq!(endpoint.headers.len(), 3);
        assert!(endpoint.url.is_err());
    }

    #[test]
    fn headers_stored_before_the_rules_are_not_sent() {
        let long = "a".repeat(100_000);
        let endpoint = Endpoint::new(
            subscription(
                "https://example.com/hook",
                &[
                    ("x-team", "billing"),
                    ("Metadata-Flavor", "Google"),
                    ("X-Forwarded-For", "10.0.0.1"),
                    (long.as_str(), "x"),
                ],
            ),
            vec![],
            &HeaderValue::from_static("Hookline/test"),
        );
        assert_eq!(endpoint.headers["x-team"], "billing");
        assert!(!endpoint.headers.contains_key("metadata-flavor"));
        assert!(!endpoint.headers.contains_key("x-forwarded-for"));
        assert_eq!(endpoint.headers.len(), 3);
    }
}
