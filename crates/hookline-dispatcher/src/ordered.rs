//! Ordered delivery in the dispatcher (docs/ARCHITECTURE.md "Ordered delivery").
//!
//! Two things, both for ordered subscriptions only:
//! - [`Promoter`]: when a batch the writer records ends the head of an ordered
//!   subscription, the store promotes the next delivery in the same transaction and
//!   returns its job, which the writer hands here to be published right after the commit (with confirms, clearing its outbox row). If that publish fails or
//!   the process dies first, the outbox relay publishes it after its grace period.
//! - [`may_attempt`]: a job of an ordered subscription is attempted only while its
//!   delivery is the head and not final, so a message redelivered after its outcome was
//!   committed (its ack lost to a crash) is not POSTed again after its successor.

use std::sync::Arc;

use hookline_broker::{Broker, QueueName};
use hookline_core::job::DeliveryJob;
use hookline_core::model::Subscription;
use hookline_store::StoreError;
use hookline_store::port::{DeliveryStore, EventStore};

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

/// Publishes the jobs `record_outcomes` promoted, right after their commit; the writer
/// hands it every batch's promoted jobs.
pub(crate) struct Promoter {
    /// Where to publish, and the store whose outbox the published jobs are cleared from;
    /// `None`: the relay publishes them.
    pub(crate) target: Option<(Arc<dyn Broker>, Arc<dyn EventStore>)>,
}

impl Promoter {
    pub(crate) fn new(broker: Arc<dyn Broker>, events: Option<Arc<dyn EventStore>>) -> Arc<Self> {
        Arc::new(Self {
            target: events.map(|events| (broker, events)),
        })
    }

    /// Queues `jobs` in a task of its own (with confirms, clearing their outbox rows), so
    /// the batch's acks do not wait for it.
    pub(crate) fn publish(&self, jobs: Vec<DeliveryJob>) {
        let Some((broker, events)) = self.target.clone() else {
            return;
        };
        if jobs.is_empty() {
            return;
        }
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
