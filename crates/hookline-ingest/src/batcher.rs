//! Group commit for the write path.
//!
//! Every `Publish` is its own small transaction if done naively, and on a 2-core machine
//! the commits, not the rows, are what PostgreSQL spends its time on. The batcher takes
//! every publish that arrives while the previous transaction is in flight and stores
//! them together: one transaction, one multi-row insert. At low load a group is a single
//! publish and nothing waits; under load the group grows by itself. Each caller gets its
//! own outcomes once the group is committed, and then queues its own deliveries inside
//! its own trace span.

use std::sync::Arc;

use hookline_store::StoreError;
use hookline_store::port::{EventStore, InsertOutcome, NewEvent};
use tokio::sync::{mpsc, oneshot};

/// Most events stored in one transaction.
const MAX_GROUP_EVENTS: usize = 2000;
/// Callers that may wait for a place in a group.
const QUEUE_DEPTH: usize = 4096;

type Reply = oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>;

struct Request {
    events: Vec<NewEvent>,
    reply: Reply,
}

/// Stores publishes in groups. Cheap to clone.
#[derive(Clone)]
pub struct PublishBatcher {
    tx: mpsc::Sender<Request>,
}

impl PublishBatcher {
    /// Starts the batching task; it ends when every clone is dropped.
    pub fn spawn(store: Arc<dyn EventStore>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, store));
        Self { tx }
    }

    /// Stores `events` in a group with whatever else is waiting; answers once the
    /// group is committed.
    pub async fn insert(&self, events: Vec<NewEvent>) -> Result<Vec<InsertOutcome>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::unavailable("the ingest writer stopped; try again");
        self.tx
            .send(Request { events, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(mut rx: mpsc::Receiver<Request>, store: Arc<dyn EventStore>) {
    while let Some(first) = rx.recv().await {
        // Everything that queued up while the last group was being written.
        let mut group = vec![first];
        let mut events = group[0].events.len();
        while events < MAX_GROUP_EVENTS {
            match rx.try_recv() {
                Ok(next) => {
                    events += next.events.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let (events_of, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|r| (r.events, r.reply)).unzip();
        let outcomes = store_group(store.as_ref(), events_of).await;
        metrics::histogram!("hookline_ingest_group_events").record(events as f64);
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}

/// Stores a group in one transaction. If that fails and the group has several
/// callers, each is stored alone, so one caller's failure is not everyone's. The events
/// are moved, never copied: payloads can be large.
async fn store_group(
    store: &dyn EventStore,
    group: Vec<Vec<NewEvent>>,
) -> Vec<Result<Vec<InsertOutcome>, StoreError>> {
    let counts: Vec<usize> = group.iter().map(Vec::len).collect();
    let mut all: Vec<NewEvent> = group.into_iter().flatten().collect();
    if counts.len() > 1 {
        match store.insert_events(&all).await {
            Ok(outcomes) => return split_by(outcomes, &counts).into_iter().map(Ok).collect(),
            Err(e) => tracing::debug!(error = %e, "group insert failed; storing each call alone"),
        }
    }
    let mut results = Vec::with_capacity(counts.len());
    for count in counts {
        let rest = all.split_off(count.min(all.len()));
        let own = std::mem::replace(&mut all, rest);
        results.push(store.insert_events(&own).await);
    }
    results
}

/// Cuts `items` into consecutive runs of the given lengths.
fn split_by<T>(mut items: Vec<T>, counts: &[usize]) -> Vec<Vec<T>> {
    let mut out = Vec::with_capacity(counts.len());
    for &count in counts {
        let rest = items.split_off(count.min(items.len()));
        out.push(std::mem::replace(&mut items, rest));
    }
    out
}
