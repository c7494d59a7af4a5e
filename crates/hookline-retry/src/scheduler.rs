//! Moves due retries from the durable schedule into the queue.
//!
//! A round that finds due retries runs in a `retry.enqueue` span of its own trace. The
//! jobs keep the `traceparent` stored with their deliveries (the outbox does not replace
//! it with this round's), so each retry's dispatcher span links to the trace of the
//! publish it retries rather than to this round.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hookline_broker::{Broker, QueueName};
use hookline_outbox::{OutboxError, publish_jobs};
use hookline_store::port::{DeliveryStore, EventStore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How often the schedule is read when nothing was due last time.
    pub poll_interval: Duration,
    /// Most retries taken per round.
    pub batch: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            batch: 500,
        }
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    deliveries: Arc<dyn DeliveryStore>,
    events: Arc<dyn EventStore>,
    broker: Arc<dyn Broker>,
}

impl Scheduler {
    pub fn new(
        config: SchedulerConfig,
        deliveries: Arc<dyn DeliveryStore>,
        events: Arc<dyn EventStore>,
        broker: Arc<dyn Broker>,
    ) -> Self {
        Self {
            config,
            deliveries,
            events,
            broker,
        }
    }

    /// One round: the retries due now go to the outbox and then to the retry queue.
    /// Returns how many were queued.
    pub async fn run_once(&self) -> Result<usize, OutboxError> {
        let jobs = self
            .deliveries
            .promote_due_retries(Utc::now(), self.config.batch)
            .await?;
        if jobs.is_empty() {
            return Ok(0);
        }
        let span = tracing::info_span!(parent: None, "retry.enqueue", retries = jobs.len());
        publish_jobs(
            self.broker.as_ref(),
            self.events.as_ref(),
            QueueName::Retries,
            &jobs,
        )
        .instrument(span)
        .await?;
        metrics::counter!("hookline_retries_enqueued_total").increment(jobs.len() as u64);
        Ok(jobs.len())
    }

    /// Runs rounds until `shutdown`; a full round is followed at once by another.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.run_once().await {
                Ok(n) if n as u32 >= self.config.batch => Duration::ZERO,
                Ok(_) => self.config.poll_interval,
                Err(e) => {
                    // Promoted rows stay in the outbox; the relay queues them.
                    tracing::warn!(error = %e, "retry round failed; will try again");
                    self.config.poll_interval
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
