//! The batching writer: makes attempt outcomes durable, then acks their messages.
//!
//! One transaction per batch (up to `write_batch` outcomes, or whatever arrived within
//! `write_linger` of the first) is where the throughput is: a commit per delivery would
//! cap the dispatcher at the database's commit rate. A message is acked only after its
//! outcome is committed. A failing write is retried with backoff for a bounded time;
//! then the messages are put back on the queue, so nothing is lost (the attempt is made
//! again). A batch the database refuses outright is written outcome by outcome, so one
//! bad outcome cannot hold back the others. Deferrals (no attempt, a retry at a time)
//! travel the same way and are counted apart from delivery outcomes.
//!
//! Each outcome travels with its delivery's span, which ends once the message is settled,
//! so a delivery's trace covers the time until its outcome is durable. A batch is written
//! in a `dispatcher.record_outcomes` span linked to the deliveries it records.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::future::join_all;
use hookline_broker::{BrokerError, ReceivedMessage};
use hookline_store::StoreError;
use hookline_store::port::{AttemptOutcome, DeliveryStore};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::limits::DeferReason;
use crate::metrics;

/// How long a failing write is retried before its messages go back to the queue.
const WRITE_RETRY_TOTAL: Duration = Duration::from_secs(15);

/// An outcome to record and the message to ack once it is.
pub(crate) struct Settle {
    pub(crate) outcome: AttemptOutcome,
    pub(crate) message: ReceivedMessage,
    /// Set when the outcome is a deferral (no attempt, a retry at a time), for the
    /// metrics: a deferral is not a delivery outcome.
    pub(crate) deferred: Option<DeferReason>,
    /// The delivery's span, closed when this is dropped (after the message is settled).
    pub(crate) span: tracing::Span,
}

/// Counts one outcome once it is durable.
fn count(outcome: &AttemptOutcome, deferred: Option<DeferReason>) {
    match deferred {
        Some(reason) => metrics::count_deferral(reason.as_str()),
        None => metrics::count_delivery_outcome(&outcome.next),
    }
}

/// Starts the writer. It ends once every sender is dropped and the last batch is
/// written.
pub(crate) fn spawn(
    store: Arc<dyn DeliveryStore>,
    batch: usize,
    linger: Duration,
) -> (mpsc::Sender<Settle>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(batch);
    let handle = tokio::spawn(run(rx, store, batch, linger));
    (tx, handle)
}

async fn run(
    mut rx: mpsc::Receiver<Settle>,
    store: Arc<dyn DeliveryStore>,
    max: usize,
    linger: Duration,
) {
    let mut batch: Vec<Settle> = Vec::with_capacity(max);
    loop {
        if rx.recv_many(&mut batch, max).await == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            let room = max - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        flush(store.as_ref(), std::mem::take(&mut batch)).await;
    }
}

/// Most links from a batch's span to its deliveries (the SDK's default limit).
const MAX_BATCH_LINKS: usize = 128;

async fn flush(store: &dyn DeliveryStore, batch: Vec<Settle>) {
    let span = tracing::debug_span!(
        parent: None,
        "dispatcher.record_outcomes",
        outcomes = batch.len(),
        otel.status_code = tracing::field::Empty,
    );
    hookline_telemetry::link_spans(&span, batch.iter().map(|s| &s.span), MAX_BATCH_LINKS);
    write(store, batch).instrument(span).await;
}

async fn write(store: &dyn DeliveryStore, batch: Vec<Settle>) {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    let mut deferrals = Vec::with_capacity(batch.len());
    // Dropped at the end, once every message is settled: that ends the delivery spans.
    let mut spans = Vec::with_capacity(batch.len());
    for s in batch {
        outcomes.push(s.outcome);
        messages.push(s.message);
        deferrals.push(s.deferred);
        spans.push(s.span);
    }
    let result = (|| store.record_outcomes(&outcomes))
        .retry(backoff())
        .when(StoreError::is_transient)
        .notify(|e, delay| {
            tracing::warn!(error = %e, retry_in = ?delay, outcomes = outcomes.len(), "cannot record attempt outcomes; retrying");
        })
        .await;
    match result {
        Ok(_) => {
            outcomes
                .iter()
                .zip(&deferrals)
                .for_each(|(o, d)| count(o, *d));
            ack_all(messages).await;
        }
        Err(e) if !e.is_transient() && outcomes.len() > 1 => {
            tracing::warn!(error = %e, outcomes = outcomes.len(), "the database refused a batch of outcomes; writing them one by one");
            for (((outcome, message), deferred), span) in outcomes
                .into_iter()
                .zip(messages)
                .zip(deferrals)
                .zip(&spans)
            {
                match store.record_outcomes(std::slice::from_ref(&outcome)).await {
                    Ok(_) => {
                        count(&outcome, deferred);
                        settled("ack", message.ack().await);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, delivery_id = %outcome.delivery_id, "cannot record an attempt outcome; putting its message back");
                        requeued(span);
                        settled("requeue", message.retry_later().await);
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, outcomes = outcomes.len(), "cannot record attempt outcomes; putting their messages back");
            tracing::Span::current().record("otel.status_code", "ERROR");
            spans.iter().for_each(requeued);
            join_all(messages.into_iter().map(|m| async {
                settled("requeue", m.retry_later().await);
            }))
            .await;
        }
    }
    drop(spans);
}

/// Marks a delivery whose outcome could not be written: its message goes back to the
/// queue and the attempt will be made again.
fn requeued(span: &tracing::Span) {
    span.record("outcome", "requeued");
    span.record("otel.status_code", "ERROR");
}

async fn ack_all(messages: Vec<ReceivedMessage>) {
    join_all(messages.into_iter().map(|m| async {
        settled("ack", m.ack().await);
    }))
    .await;
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(3))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(WRITE_RETRY_TOTAL))
}

/// Logs a settlement that did not reach the broker. A stale delivery (the channel closed
/// since) is redelivered by the broker and needs nothing more.
pub(crate) fn settled(what: &str, result: Result<(), BrokerError>) {
    match result {
        Ok(()) | Err(BrokerError::StaleDelivery) => {}
        Err(e) => tracing::warn!(error = %e, "cannot {what} a message; it will be redelivered"),
    }
}
