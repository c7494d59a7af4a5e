//! The storage port: what the services need from a database, as traits.
//!
//! Services depend on these traits only, so the PostgreSQL adapter (clusters) and the
//! SQLite adapter (embedded mode) are interchangeable without touching service code.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_core::Id;
use hookline_core::client_cert::ClientIdentity;
use hookline_core::job::DeliveryJob;
use hookline_core::model::{
    ApiKey, Attempt, Delivery, DeliveryStatus, Event, EventType, Ordering, PayloadFormat,
    Subscription, SubscriptionSecret, SubscriptionState, Tenant,
};
use hookline_core::quota::TenantQuotas;

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
    /// At most this many items; 0 means [`DEFAULT_PAGE_LIMIT`], and more than
    /// [`MAX_PAGE_LIMIT`] is clamped (see [`PageRequest::effective_limit`]).
    pub limit: u32,
}

/// Page length when a request asks for 0.
pub const DEFAULT_PAGE_LIMIT: u32 = 50;
/// The longest page a list call returns.
pub const MAX_PAGE_LIMIT: u32 = 1000;

impl PageRequest {
    /// The first page, of the longest length a list call returns: for callers that read
    /// every page of a list.
    pub fn first_of_max() -> Self {
        Self {
            after: None,
            limit: MAX_PAGE_LIMIT,
        }
    }

    /// A page asked for by a client: `page_token` the cursor ("" for the first page),
    /// `page_size` its length. A length over [`MAX_PAGE_LIMIT`] is refused (the message
    /// says what is allowed) rather than quietly shortened.
    pub fn from_client(page_size: u32, page_token: &str) -> Result<Self, StoreError> {
        if page_size > MAX_PAGE_LIMIT {
            return Err(StoreError::invalid(
                "page_size",
                format!(
                    "is {page_size}; the limit is {MAX_PAGE_LIMIT} (0 means {DEFAULT_PAGE_LIMIT})"
                ),
            ));
        }
        Ok(Self {
            after: (!page_token.is_empty()).then(|| page_token.to_string()),
            limit: page_size,
        })
    }

    /// The page length this request gets: 0 means [`DEFAULT_PAGE_LIMIT`], longer than
    /// [`MAX_PAGE_LIMIT`] is clamped.
    pub fn effective_limit(&self) -> u32 {
        match self.limit {
            0 => DEFAULT_PAGE_LIMIT,
            n => n.min(MAX_PAGE_LIMIT),
        }
    }
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
    pub payload_format: PayloadFormat,
    /// Unordered (the default) or ordered: one delivery at a time, in publish order.
    pub ordering: Ordering,
    /// The client certificate presented to the receiver (mutual TLS), if any.
    pub client_identity: Option<ClientIdentity>,
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
    /// Replaces the tenant's own quotas (`None` = the server's default).
    async fn set_tenant_quotas(&self, id: &Id, quotas: &TenantQuotas)
    -> Result<Tenant, StoreError>;

    /// Creates a subscription; only the tenant's own `max_subscriptions` limits it.
    async fn create_subscription(&self, new: &NewSubscription) -> Result<Subscription, StoreError> {
        self.create_subscription_within(new, u32::MAX).await
    }
    /// Creates a subscription unless its tenant has as many as its quota already: the
    /// tenant's `max_subscriptions`, else `default_limit`. Concurrent creates of one tenant
    /// are serialised on the tenant, so they never exceed it together; over the quota the
    /// answer is [`StoreError::Quota`] and nothing is stored.
    async fn create_subscription_within(
        &self,
        new: &NewSubscription,
        default_limit: u32,
    ) -> Result<Subscription, StoreError>;
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
    /// Enables or disables a subscription (by a person, by `410 Gone`, by sustained
    /// failure), recording why; returns the stored row.
    async fn set_subscription_state(
        &self,
        id: &Id,
        state: SubscriptionState,
        reason: Option<&str>,
    ) -> Result<Subscription, StoreError>;
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

    /// Records that a dispatcher's circuit breaker holds the subscription's deliveries
    /// back until `until` (`None`: the circuit closed). A missing subscription is no error.
    async fn set_circuit_open_until(
        &self,
        id: &Id,
        until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError>;
    /// Until when the subscription's circuit was last recorded open, if it was.
    async fn circuit_open_until(&self, id: &Id) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Sets (`None`: removes) the client certificate the subscription presents to its
    /// receiver, stamping its `updated_at`; `NotFound` when it does not exist.
    async fn set_client_identity(
        &self,
        id: &Id,
        identity: Option<&ClientIdentity>,
    ) -> Result<(), StoreError>;
    /// The client certificates of those of `ids` that have one.
    async fn client_identities(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, ClientIdentity>, StoreError>;
    /// The current signing secret (not rotated out) of those of `ids` that exist: one
    /// query for a page of subscriptions rather than one per subscription.
    async fn current_secrets(
        &self,
        ids: &[Id],
    ) -> Result<HashMap<Id, SubscriptionSecret>, StoreError>;
}

/// Figures the admin port exports as gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Deliveries waiting in the retry schedule.
    pub retry_backlog: u64,
    /// The earliest due time in the retry schedule.
    pub oldest_due_retry: Option<DateTime<Utc>>,
    /// Deliveries committed but not yet confirmed in the queue.
    pub outbox: u64,
    pub subscriptions_enabled: u64,
    pub subscriptions_disabled: u64,
}

/// Liveness and size of the backing database, for `/readyz` and `/metrics`.
#[async_trait]
pub trait StoreHealth: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), StoreError>;
    /// A few counts; cheap enough to read every few seconds.
    async fn stats(&self) -> Result<PipelineStats, StoreError>;
}

/// An event to store, with the subscriptions that get a delivery of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event: Event,
    /// One delivery is created per subscription, in this order.
    pub subscription_ids: Vec<Id>,
    /// The W3C `traceparent` of the publish, stored with each delivery so that every job
    /// of it (first attempt, retries, relayed) can be connected to the publish's trace.
    pub traceparent: Option<String>,
}

/// What storing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The event was stored with these jobs (first attempts), parallel to the
    /// subscriptions given; each also sits in the outbox until `confirm_published`.
    /// A subscription named twice gets one job; one deleted since it was matched gets
    /// none (rather than failing the publish).
    Created {
        event_id: Id,
        jobs: Vec<DeliveryJob>,
        /// Deliveries also created for the event but held behind the head of their
        /// ordered subscription (no job yet; queued when their turn comes).
        held: u32,
    },
    /// The tenant already had an event with this idempotency key: nothing was stored.
    Duplicate { event_id: Id, deliveries: u32 },
}

/// Which events to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    pub tenant_id: Id,
    pub event_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Events and the outbox of deliveries waiting to be queued.
///
/// The outbox holds every delivery that must be in the queue but whose publish is not
/// confirmed yet: new deliveries, due retries and manual retries. Whoever publishes
/// confirms; a relay re-publishes what stays unconfirmed (a crash between commit and
/// publish), so nothing committed is ever stranded.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// One transaction: every event, one `pending` delivery per subscription, and an
    /// outbox row per delivery. An event whose idempotency key its tenant already used
    /// creates nothing (also when two publishes race) and reports the original.
    async fn insert_events(&self, events: &[NewEvent]) -> Result<Vec<InsertOutcome>, StoreError>;
    /// Removes published deliveries from the outbox.
    async fn confirm_published(&self, delivery_ids: &[Id]) -> Result<(), StoreError>;
    /// Leases up to `limit` outbox entries created before `older_than` and not leased by
    /// someone else, until `lease_until`, and returns their jobs. A lease that runs out
    /// without `confirm_published` makes the entry leasable again.
    async fn lease_unpublished(
        &self,
        older_than: DateTime<Utc>,
        limit: u32,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<DeliveryJob>, StoreError>;
    async fn get_event(&self, id: &Id) -> Result<Event, StoreError>;
    /// Events newest first; the cursor is the last id.
    async fn list_events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, StoreError>;
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// The receiver answered 2xx.
    Succeeded,
    /// Try again at this time (a `retry_schedule` row).
    RetryAt(DateTime<Utc>),
    /// No more attempts: the schedule is spent, the subscription is gone or disabled.
    Failed { reason: String },
}

/// The outcome of one attempt, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub delivery_id: Id,
    /// The HTTP attempt, if one was made (none when the subscription was disabled).
    /// Its `attempt_number` is ignored: the store numbers attempts after the last
    /// recorded one, so a redelivered job never collides with an earlier record.
    /// An attempt whose `id` the delivery has recorded already means the same write is
    /// being retried (say, after a lost commit acknowledgement): the whole outcome is
    /// skipped, so retrying `record_outcomes` is safe.
    pub attempt: Option<Attempt>,
    pub next: NextStep,
    /// Why the delivery was put off without an attempt (`circuit_open`, `in_flight`,
    /// `rate_limit`), with `next` the time it runs again. Kept only for an outcome with
    /// no attempt and a `RetryAt`: see [`AttemptOutcome::deferral`].
    pub deferred_reason: Option<String>,
}

impl AttemptOutcome {
    /// The delivery's `deferred_reason` after this outcome: a deferral says why it waits;
    /// anything else (an attempt, success, failure) clears it.
    pub fn deferral(&self) -> Option<String> {
        match (&self.attempt, &self.next) {
            (None, NextStep::RetryAt(_)) => self.deferred_reason.clone(),
            _ => None,
        }
    }
}

/// Which deliveries to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    pub tenant_id: Option<Id>,
    pub subscription_id: Option<Id>,
    pub event_id: Option<Id>,
    pub status: Option<DeliveryStatus>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Delivery state: attempts, the retry schedule, and manual retries.
#[async_trait]
pub trait DeliveryStore: Send + Sync + 'static {
    /// One transaction for the whole batch: each attempt, the delivery's status and
    /// counters (`attempt_count`, `last_*`, `next_attempt_at`), and its retry-schedule
    /// row (upserted for `RetryAt`, removed otherwise). Outcomes of deliveries that no
    /// longer exist (their subscription was deleted) are skipped.
    ///
    /// In the same transaction, a final outcome of an ordered subscription's head promotes
    /// the next delivery of that subscription (head and outbox row): its job is returned,
    /// to be published once this returns (the relay publishes it otherwise).
    async fn record_outcomes(
        &self,
        outcomes: &[AttemptOutcome],
    ) -> Result<Vec<DeliveryJob>, StoreError>;
    /// Whether a job of this delivery may be attempted now: not when the delivery is gone
    /// or final (a redelivered duplicate), nor when it waits behind the head of its
    /// ordered subscription. One indexed read; dispatchers ask it for ordered
    /// subscriptions only.
    async fn may_attempt(&self, delivery_id: &Id) -> Result<bool, StoreError>;
    /// One transaction: takes up to `limit` retry-schedule rows due at `now` (skipping
    /// rows other replicas hold), moves them to the outbox, marks their deliveries
    /// `pending`, and returns their jobs (attempt number = attempts so far + 1).
    async fn promote_due_retries(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DeliveryJob>, StoreError>;
    /// The same for chosen deliveries, whatever their state (a manual retry): drops any
    /// scheduled retry, puts them in the outbox, marks them `pending`.
    async fn requeue_deliveries(&self, ids: &[Id]) -> Result<Vec<DeliveryJob>, StoreError>;
    /// Ids of the failed deliveries of a subscription created in `[since, until)`,
    /// oldest first, at most `limit`.
    async fn failed_deliveries(
        &self,
        subscription_id: &Id,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<Id>, StoreError>;
    async fn get_delivery(&self, id: &Id) -> Result<Delivery, StoreError>;
    /// Deliveries newest first; the cursor is the last id.
    async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Delivery>, StoreError>;
    /// Attempts of a delivery, oldest first; the cursor is the last attempt number (a
    /// cursor that is not one is `NotFound` "page token").
    async fn list_attempts(
        &self,
        delivery_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Attempt>, StoreError>;
    /// Deliveries whose `updated_at` is after `after`, oldest change first, at most
    /// `limit` (for following changes as they happen).
    async fn deliveries_updated_after(
        &self,
        filter: &DeliveryFilter,
        after: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_rules_zero_means_the_default_and_the_maximum_is_the_limit() {
        assert_eq!(PageRequest::default().effective_limit(), DEFAULT_PAGE_LIMIT);
        let long = PageRequest {
            after: None,
            limit: MAX_PAGE_LIMIT + 1,
        };
        assert_eq!(long.effective_limit(), MAX_PAGE_LIMIT);
        let page = PageRequest::from_client(MAX_PAGE_LIMIT, "ten_x").expect("at the limit");
        assert_eq!(page.after.as_deref(), Some("ten_x"));
        assert_eq!(
            PageRequest::from_client(0, "").expect("default").after,
            None
        );
        let err = PageRequest::from_client(MAX_PAGE_LIMIT + 1, "").expect_err("over");
        assert_eq!(
            err.to_string(),
            "page_size: is 1001; the limit is 1000 (0 means 50)"
        );
    }
}
