//! The batching writer: makes attempt outcomes durable, then acks their messages.
//!
//! One transaction per batch (up to `write_batch` outcomes, or whatever arrived within
//! `write_linger` of the first) is where the throughput is: a commit per delivery would
//! cap the dispatcher at the database's commit rate. While a batch is being written the
//! next one keeps growing, and starts when that write ends (group commit: one transaction
//! for everything that arrived meanwhile) or once it is full; so up to `writes_in_flight`
//! full batches are written at once, and a partial one never waits behind a full one. A
//! message is acked only after its
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
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument as _;

use crate::limits::DeferReason;
use crate::metrics;
use crate::ordered::Promoter;

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

/// Starts the writer, with at most `in_flight` (at least 1) batches being written at
/// once. It ends once every sender is dropped and every batch is written.
pub(crate) fn spawn(
    store: Arc<dyn DeliveryStore>,
    promoter: Arc<Promoter>,
    batch: usize,
    linger: Duration,
    in_flight: usize,
) -> (mpsc::Sender<Settle>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(batch);
    let handle = tokio::spawn(run(rx, store, promoter, batch, linger, in_flight.max(1)));
    (tx, handle)
}

/// Collects batches and writes each in a task of its own. A batch starts at once when
/// nothing is being written; otherwise it grows until a write ends, or until it is full
/// (`max`) and one of the `in_flight` slots is free. Starting a partial batch beside a
/// write in flight would halve the batches and double the transactions per outcome
/// (docs/BENCHMARKS.md, pass 4); waiting for a full one would stall a burst. Each batch's
/// messages are acked after its own commit; batches are independent (a delivery's next
/// attempt is only queued after its outcome is durable, and the store locks the
/// deliveries a batch changes).
async fn run(
    mut rx: mpsc::Receiver<Settle>,
    store: Arc<dyn DeliveryStore>,
    promoter: Arc<Promoter>,
    max: usize,
    linger: Duration,
    in_flight: usize,
) {
    let mut writing = JoinSet::new();
    loop {
        let mut batch: Vec<Settle> = Vec::with_capacity(max);
        if rx.recv_many(&mut batch, max).await == 0 {
            break;
        }
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            let room = max - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // Writes in flight: grow until one ends, or until full with a slot free.
        while !writing.is_empty() && (batch.len() < max || writing.len() >= in_flight) {
            let room = max - batch.len();
            tokio::select! {
                biased;
                _ = writing.join_next() => break,
                n = rx.recv_many(&mut batch, room), if room > 0 => if n == 0 { break },
            }
        }
        writing.spawn(flush(store.clone(), promoter.clone(), batch));
    }
    while writing.join_next().await.is_some() {}
}

/// Most links from a batch's span to its deliveries (the SDK's default limit).
const MAX_BATCH_LINKS: usize = 128;

async fn flush(store: Arc<dyn DeliveryStore>, promoter: Arc<Promoter>, batch: Vec<Settle>) {
    let span = tracing::debug_span!(
        parent: None,
        "dispatcher.record_outcomes",
        outcomes = batch.len(),
        otel.status_code = tracing::field::Empty,
    );
    hookline_telemetry::link_spans(&span, batch.iter().map(|s| &s.span), MAX_BATCH_LINKS);
    write(store.as_ref(), &promoter, batch)
        .instrument(span)
        .await;
}

/// Records a batch, acks (or requeues) its messages, and hands the jobs its commit
/// promoted (ordered subscriptions) to `promoter`.
async fn write(store: &dyn DeliveryStore, promoter: &Promoter, batch: Vec<Settle>) {
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
        Ok(promoted) => {
            promoter.publish(promoted);
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
                    Ok(promoted) => {
                        promoter.publish(promoted);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use chrono::{DateTime, Utc};
    use hookline_broker::{Acker, Settlement};
    use hookline_core::job::DeliveryJob;
    use hookline_core::model::{Attempt, Delivery};
    use hookline_core::{Id, IdKind};
    use hookline_store::PageRequest;
    use hookline_store::port::{DeliveryFilter, NextStep, Page};
    use tokio::sync::{Notify, Semaphore};

    use super::*;

    /// A store whose writes wait for a permit each, counting how many wait at once.
    struct HeldStore {
        release: Semaphore,
        started: Notify,
        writing: Mutex<(usize, usize)>,
        /// The size of each batch, in the order their writes started.
        sizes: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl DeliveryStore for HeldStore {
        async fn record_outcomes(
            &self,
            outcomes: &[AttemptOutcome],
        ) -> Result<Vec<DeliveryJob>, StoreError> {
            self.sizes.lock().unwrap().push(outcomes.len());
            {
                let mut w = self.writing.lock().unwrap();
                w.0 += 1;
                w.1 = w.1.max(w.0);
            }
            self.started.notify_waiters();
            self.release.acquire().await.unwrap().forget();
            self.writing.lock().unwrap().0 -= 1;
            Ok(Vec::new())
        }
        async fn may_attempt(&self, _: &Id) -> Result<bool, StoreError> {
            unimplemented!()
        }
        async fn promote_due_retries(
            &self,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<Vec<DeliveryJob>, StoreError> {
            unimplemented!()
        }
        async fn requeue_deliveries(&self, _: &[Id]) -> Result<Vec<DeliveryJob>, StoreError> {
            unimplemented!()
        }
        async fn failed_deliveries(
            &self,
            _: &Id,
            _: DateTime<Utc>,
            _: Option<DateTime<Utc>>,
            _: u32,
        ) -> Result<Vec<Id>, StoreError> {
            unimplemented!()
        }
        async fn get_delivery(&self, _: &Id) -> Result<Delivery, StoreError> {
            unimplemented!()
        }
        async fn list_deliveries(
            &self,
            _: &DeliveryFilter,
            _: &PageRequest,
        ) -> Result<Page<Delivery>, StoreError> {
            unimplemented!()
        }
        async fn list_attempts(
            &self,
            _: &Id,
            _: &PageRequest,
        ) -> Result<Page<Attempt>, StoreError> {
            unimplemented!()
        }
        async fn deliveries_updated_after(
            &self,
            _: &DeliveryFilter,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<Vec<Delivery>, StoreError> {
            unimplemented!()
        }
    }

    /// Counts acks.
    struct CountingAcker(Arc<Mutex<usize>>);

    #[async_trait]
    impl Acker for CountingAcker {
        async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BrokerError> {
            assert!(matches!(settlement, Settlement::Ack));
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }

    fn settle(acks: &Arc<Mutex<usize>>) -> Settle {
        Settle {
            outcome: AttemptOutcome {
                delivery_id: Id::new(IdKind::Delivery),
                attempt: None,
                next: NextStep::Succeeded,
                deferred_reason: None,
            },
            message: ReceivedMessage::new(
                Vec::new(),
                BTreeMap::new(),
                false,
                Box::new(CountingAcker(acks.clone())),
            ),
            deferred: None,
            span: tracing::Span::none(),
        }
    }

    /// Waits until `n` writes run at once.
    async fn until_writing(store: &HeldStore, n: usize) {
        loop {
            let started = store.started.notified();
            if store.writing.lock().unwrap().0 >= n {
                return;
            }
            tokio::time::timeout(Duration::from_secs(5), started)
                .await
                .unwrap_or_else(|_| panic!("{n} writes never ran at once"));
        }
    }

    #[tokio::test]
    async fn a_batch_grows_while_a_write_is_in_flight_and_full_ones_run_side_by_side() {
        let store = Arc::new(HeldStore {
            release: Semaphore::new(0),
            started: Notify::new(),
            writing: Mutex::new((0, 0)),
            sizes: Mutex::new(Vec::new()),
        });
        let acks = Arc::new(Mutex::new(0));
        let (tx, writer) = spawn(
            store.clone(),
            Arc::new(Promoter { target: None }),
            2,
            Duration::ZERO,
            2,
        );
        // Nothing in flight: the first outcome is written at once, alone.
        tx.send(settle(&acks)).await.unwrap();
        until_writing(&store, 1).await;
        // While it is held, the next batch grows instead of starting beside it, and
        // starts in the free slot once full.
        tx.send(settle(&acks)).await.unwrap();
        tx.send(settle(&acks)).await.unwrap();
        until_writing(&store, 2).await;
        // With both slots taken, the next one waits for a write to end.
        tx.send(settle(&acks)).await.unwrap();
        assert_eq!(
            *acks.lock().unwrap(),
            0,
            "nothing is acked before its commit"
        );
        drop(tx);
        store.release.add_permits(3);
        writer.await.unwrap();
        assert_eq!(*acks.lock().unwrap(), 4, "every message acked once written");
        assert_eq!(
            *store.sizes.lock().unwrap(),
            vec![1, 2, 1],
            "the second batch grew to full while the first was written"
        );
        assert_eq!(
            store.writing.lock().unwrap().1,
            2,
            "never more than the bound"
        );
    }
}
