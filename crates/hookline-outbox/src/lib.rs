//! The way from the database to the queue.
//!
//! Every delivery that must reach a dispatcher is first committed to the store's outbox
//! (new deliveries, due retries, manual retries). [`publish_jobs`] then publishes it with
//! publisher confirms and clears the outbox entry. If the process dies in between, the
//! [`Relay`] finds the entry after a grace period and publishes it again, so a committed
//! delivery is never stranded. Duplicates are possible (at-least-once); receivers
//! deduplicate on `webhook-id`.
//!
//! Publishing runs in a `queue.publish` span and writes the trace context into each
//! message's headers, so the dispatcher continues the trace. A job carries the
//! `traceparent` stored with its delivery; the current span replaces it only when it is of
//! the same trace (ingest publishing what it just stored). A relay or retry round runs in
//! a trace of its own and leaves the stored one in place: the dispatcher then continues
//! (first attempt) or links to (retry) the publish's trace, not the round's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hookline_broker::{Broker, BrokerError, OutgoingMessage, QueueName};
use hookline_core::Id;
use hookline_core::job::DeliveryJob;
use hookline_store::StoreError;
use hookline_store::port::EventStore;
use hookline_telemetry::{TRACEPARENT, trace_id_of};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("publishing to the queue failed: {0}")]
    Broker(#[from] BrokerError),
    #[error("clearing the outbox failed: {0}")]
    Store(#[from] StoreError),
}

/// The queue message of a job. `trace` is the context of the publishing span as
/// headers (see [`hookline_telemetry::inject_current`]; empty when not tracing): it
/// replaces the job's stored `traceparent` when it continues the same trace, or when the
/// job has none.
pub fn job_message(job: &DeliveryJob, trace: &BTreeMap<String, String>) -> OutgoingMessage {
    let mut headers = job.headers();
    if let Some(current) = trace.get(TRACEPARENT) {
        let same_trace = match job.traceparent.as_deref() {
            None => true,
            Some(stored) => {
                trace_id_of(stored).is_some() && trace_id_of(stored) == trace_id_of(current)
            }
        };
        if same_trace {
            headers.extend(trace.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    OutgoingMessage {
        body: job.payload.clone(),
        headers,
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
    publish_traced(broker, queue, jobs, Clear::Now(store)).await
}

/// Like [`publish_jobs`], but the outbox rows are removed later, in batches, by
/// `confirmer`: the hot path saves one transaction per call. If the process stops before
/// the batch is written, the relay publishes those deliveries again (a duplicate, never
/// a loss).
pub async fn publish_jobs_batched(
    broker: &dyn Broker,
    confirmer: &Confirmer,
    queue: QueueName,
    jobs: &[DeliveryJob],
) -> Result<(), OutboxError> {
    publish_traced(broker, queue, jobs, Clear::Batched(confirmer)).await
}

/// How published jobs leave the outbox.
enum Clear<'a> {
    Now(&'a dyn EventStore),
    Batched(&'a Confirmer),
}

async fn publish_traced(
    broker: &dyn Broker,
    queue: QueueName,
    jobs: &[DeliveryJob],
    clear: Clear<'_>,
) -> Result<(), OutboxError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let span = tracing::debug_span!(
        "queue.publish",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.operation.type = "send",
        messaging.destination.name = queue.kind().as_str(),
        messaging.batch.message_count = jobs.len(),
    );
    async {
        let trace = hookline_telemetry::inject_current();
        let messages = jobs.iter().map(|j| job_message(j, &trace)).collect();
        broker.publish(queue, messages).await?;
        let ids: Vec<Id> = jobs.iter().map(|j| j.delivery_id.clone()).collect();
        match clear {
            Clear::Now(store) => store.confirm_published(&ids).await?,
            Clear::Batched(confirmer) => confirmer.confirm(ids).await,
        }
        Ok(())
    }
    .instrument(span.clone())
    .await
    .inspect_err(|_: &OutboxError| {
        span.record("otel.status_code", "ERROR");
    })
}

/// Most outbox rows removed in one statement.
const CONFIRM_BATCH: usize = 5000;

/// Removes published deliveries from the outbox in batches, in the background: all
/// the confirmations that arrive while one DELETE runs go into the next.
#[derive(Clone)]
pub struct Confirmer {
    tx: tokio::sync::mpsc::Sender<Vec<Id>>,
}

impl Confirmer {
    /// Starts the background task; it ends when every clone is dropped.
    pub fn spawn(store: Arc<dyn EventStore>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Id>>(1024);
        tokio::spawn(async move {
            while let Some(mut ids) = rx.recv().await {
                while ids.len() < CONFIRM_BATCH {
                    match rx.try_recv() {
                        Ok(more) => ids.extend(more),
                        Err(_) => break,
                    }
                }
                if let Err(e) = store.confirm_published(&ids).await {
                    tracing::warn!(error = %e, deliveries = ids.len(), "outbox rows not cleared; the relay will publish these deliveries again");
                }
            }
        });
        Self { tx }
    }

    /// Queues `ids` for removal from the outbox.
    pub async fn confirm(&self, ids: Vec<Id>) {
        if self.tx.send(ids).await.is_err() {
            tracing::warn!(
                "outbox confirmer stopped; the relay will publish these deliveries again"
            );
        }
    }
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
        // A round that found work is a trace of its own; each job keeps the context of
        // the publish that created it.
        let span = tracing::info_span!(parent: None, "outbox.relay", deliveries = jobs.len());
        self.republish(jobs).instrument(span).await
    }

    async fn republish(&self, jobs: Vec<DeliveryJob>) -> Result<usize, OutboxError> {
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

#[cfg(test)]
mod tests {
    use hookline_core::IdKind;
    use hookline_core::job::H_TRACEPARENT;

    use super::*;

    const STORED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const SAME_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
    const OTHER_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-2222222222222222-01";

    fn job(traceparent: Option<&str>) -> DeliveryJob {
        DeliveryJob {
            delivery_id: Id::new(IdKind::Delivery),
            event_id: Id::new(IdKind::Event),
            tenant_id: Id::new(IdKind::Tenant),
            subscription_id: Id::new(IdKind::Subscription),
            event_type: "invoice.paid".into(),
            attempt_number: 1,
            payload: b"{}".to_vec(),
            traceparent: traceparent.map(str::to_owned),
        }
    }

    fn trace(traceparent: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TRACEPARENT.to_owned(), traceparent.to_owned()),
            ("tracestate".to_owned(), "k=v".to_owned()),
        ])
    }

    fn header(m: &OutgoingMessage) -> Option<&str> {
        m.headers.get(H_TRACEPARENT).map(String::as_str)
    }

    #[test]
    fn the_publishing_span_continues_its_own_trace_only() {
        // Not tracing: the stored context, or none.
        assert_eq!(
            header(&job_message(&job(Some(STORED)), &BTreeMap::new())),
            Some(STORED)
        );
        assert_eq!(header(&job_message(&job(None), &BTreeMap::new())), None);
        // Ingest publishing what it stored: the later span of the same trace.
        let m = job_message(&job(Some(STORED)), &trace(SAME_TRACE));
        assert_eq!(header(&m), Some(SAME_TRACE));
        assert_eq!(m.headers.get("tracestate").map(String::as_str), Some("k=v"));
        // A retry round of another trace: the publish's context stays.
        let m = job_message(&job(Some(STORED)), &trace(OTHER_TRACE));
        assert_eq!(header(&m), Some(STORED));
        assert!(!m.headers.contains_key("tracestate"));
        // A job that had none gets the publisher's.
        assert_eq!(
            header(&job_message(&job(None), &trace(OTHER_TRACE))),
            Some(OTHER_TRACE)
        );
    }
}
