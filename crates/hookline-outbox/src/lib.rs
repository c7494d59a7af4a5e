//! The way from the database to the queue.
//!
//! Every delivery that must reach a dispatcher is first committed to the store's outbox
//! (new deliveries, due retries, manual retries). [`publish_jobs`] then publishes it with
//! publisher confirms and clears the outbox entry. If the process dies in between, the
//! [`Relay`] finds the entry after a grace period and publishes it again, so a committed
//! delivery is never stranded. Duplicates are possible (at-least-once); receivers
//! deduplicate on `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hookline_broker::{Broker, BrokerError, OutgoingMessage, QueueName};
use hookline_core::Id;
use hookline_core::job::DeliveryJob;
use hookline_store::StoreError;
use hookline_store::port::EventStore;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("publishing to the queue failed: {0}")]
    Broker(#[from] BrokerError),
    #[error("clearing the outbox failed: {0}")]
    Store(#[from] StoreError),
}

/// The queue message of a job.
pub fn job_message(job: &DeliveryJob) -> OutgoingMessage {
    OutgoingMessage {
        body: job.payload.clone(),
        headers: job.headers(),
    }
}

/// Publishes jobs to `queue` (waiting for every confirm), then removes them from the
/// outbox. On error the entries stay in the outbox for the relay.
pub async fn publish_jobs(
    broker: &dyn Broker,
    store: &dyn EventStore,
    queue: QueueName,
    jobs: &[DeliveryJob],
) -> Result<(), OutboxError> {
    if jobs.is_empty() {
        return Ok(());
    }
    broker
        .publish(queue, jobs.iter().map(job_message).collect())
        .await?;
    let ids: Vec<Id> = jobs.iter().map(|j| j.delivery_id.clone()).collect();
    store.confirm_published(&ids).await?;
    Ok(())
}

/// Settings of the relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// How old an outbox entry must be before the relay takes it: longer than a normal
    /// publish takes, so the relay does not race the publisher.
    pub grace: Duration,
    /// How long a leased entry is left to this relay before another may take it.
    pub lease: Duration,
    /// How often the relay looks.
    pub interval: Duration,
    /// Most entries per round.
    pub batch: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            interval: Duration::from_secs(2),
            batch: 500,
        }
    }
}

/// Re-publishes outbox entries that nobody confirmed. Any number of relays may run;
/// leases keep them from taking the same entry at once.
pub struct Relay {
    config: RelayConfig,
    store: Arc<dyn EventStore>,
    broker: Arc<dyn Broker>,
}

impl Relay {
    pub fn new(config: RelayConfig, store: Arc<dyn EventStore>, broker: Arc<dyn Broker>) -> Self {
        Self {
            config,
            store,
            broker,
        }
    }

    /// One round: leases what is stranded, publishes it, confirms it. Returns how many
    /// deliveries were re-published.
    pub async fn run_once(&self) -> Result<usize, OutboxError> {
        let now = Utc::now();
        let older_than = now - chrono::Duration::from_std(self.config.grace).unwrap_or_default();
        let lease_until = now + chrono::Duration::from_std(self.config.lease).unwrap_or_default();
        let jobs = self
            .store
            .lease_unpublished(older_than, self.config.batch, lease_until)
            .await?;
        if jobs.is_empty() {
            return Ok(0);
        }
        tracing::warn!(
            count = jobs.len(),
            "re-publishing deliveries whose publish was never confirmed"
        );
        // A job that was attempted before goes to the retry queue, a first attempt to
        // the delivery queue, as their publishers would have done.
        let (first, later): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|j| j.attempt_number <= 1);
        publish_jobs(
            self.broker.as_ref(),
            self.store.as_ref(),
            QueueName::Deliveries,
            &first,
        )
        .await?;
        publish_jobs(
            self.broker.as_ref(),
            self.store.as_ref(),
            QueueName::Retries,
            &later,
        )
        .await?;
        let count = first.len() + later.len();
        metrics::counter!("hookline_outbox_relayed_total").increment(count as u64);
        Ok(count)
    }

    /// Runs rounds until `shutdown`; a full round is followed at once by another.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.run_once().await {
                Ok(n) if n as u32 >= self.config.batch => Duration::ZERO,
                Ok(_) => self.config.interval,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay round failed; will try again");
                    self.config.interval
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
