//! Ordered delivery in the dispatcher (docs/ARCHITECTURE.md "Ordered delivery").
//!
//! Two things, both for ordered subscriptions only:
//! - [`PromotingStore`] wraps the delivery store the writer records outcomes through:
//!   when a batch ends the head of an ordered subscription, the store promotes the next
//!   delivery in the same transaction and returns its job, which is published here right
//!   after the commit (with confirms, clearing its outbox row). If that publish fails or
//!   the process dies first, the outbox relay publishes it after its grace period.
//! - [`may_attempt`]: a job of an ordered subscription is attempted only while its
//!   delivery is the head and not final, so a message redelivered after its outcome was
//!   committed (its ack lost to a crash) is not POSTed again after its successor.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_broker::{Broker, QueueName};
use hookline_core::Id;
use hookline_core::job::DeliveryJob;
use hookline_core::model::{Attempt, Delivery, Subscription};
use hookline_store::StoreError;
use hookline_store::port::{
    AttemptOutcome, DeliveryFilter, DeliveryStore, EventStore, Page, PageRequest,
};

/// Whether `job` may be attempted now: always for an unordered subscription (no read);
/// for an ordered one, what the store says (one indexed read).
pub(crate) async fn may_attempt(
    store: &dyn DeliveryStore,
    subscription: &Subscription,
    job: &DeliveryJob,
) -> Result<bool, StoreError> {
    if !subscription.ordering.is_ordered() {
        return Ok(true);
    }
    store.may_attempt(&job.delivery_id).await
}

/// A [`DeliveryStore`] that publishes the jobs `record_outcomes` promotes.
pub(crate) struct PromotingStore {
    pub(crate) inner: Arc<dyn DeliveryStore>,
    pub(crate) broker: Arc<dyn Broker>,
    /// Where published jobs are cleared from the outbox; `None`: the relay publishes them.
    pub(crate) events: Option<Arc<dyn EventStore>>,
}

impl PromotingStore {
    pub(crate) fn wrap(
        inner: Arc<dyn DeliveryStore>,
        broker: Arc<dyn Broker>,
        events: Option<Arc<dyn EventStore>>,
    ) -> Arc<dyn DeliveryStore> {
        Arc::new(Self {
            inner,
            broker,
            events,
        })
    }

    fn publish(&self, jobs: Vec<DeliveryJob>) {
        let Some(events) = self.events.clone() else {
            return;
        };
        if jobs.is_empty() {
            return;
        }
        let broker = self.broker.clone();
        tokio::spawn(async move {
            let published = hookline_outbox::publish_jobs(
                broker.as_ref(),
                events.as_ref(),
                QueueName::Deliveries,
                &jobs,
            )
            .await;
            if let Err(e) = published {
                tracing::warn!(error = %e, deliveries = jobs.len(), "promoted ordered deliveries not queued yet; the relay will queue them");
            }
        });
    }
}

#[async_trait]
impl DeliveryStore for PromotingStore {
    async fn record_outcomes(
        &self,
        outcomes: &[AttemptOutcome],
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        let promoted = self.inner.record_outcomes(outcomes).await?;
        self.publish(promoted);
        Ok(Vec::new())
    }

    async fn may_attempt(&self, delivery_id: &Id) -> Result<bool, StoreError> {
        self.inner.may_attempt(delivery_id).await
    }

    async fn promote_due_retries(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        self.inner.promote_due_retries(now, limit).await
    }

    async fn requeue_deliveries(&self, ids: &[Id]) -> Result<Vec<DeliveryJob>, StoreError> {
        self.inner.requeue_deliveries(ids).await
    }

    async fn failed_deliveries(
        &self,
        subscription_id: &Id,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<Id>, StoreError> {
        self.inner
            .failed_deliveries(subscription_id, since, until, limit)
            .await
    }

    async fn get_delivery(&self, id: &Id) -> Result<Delivery, StoreError> {
        self.inner.get_delivery(id).await
    }

    async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Delivery>, StoreError> {
        self.inner.list_deliveries(filter, page).await
    }

    async fn list_attempts(
        &self,
        delivery_id: &Id,
        page: &PageRequest,
    ) -> Result<Page<Attempt>, StoreError> {
        self.inner.list_attempts(delivery_id, page).await
    }

    async fn deliveries_updated_after(
        &self,
        filter: &DeliveryFilter,
        after: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.inner
            .deliveries_updated_after(filter, after, limit)
            .await
    }
}
