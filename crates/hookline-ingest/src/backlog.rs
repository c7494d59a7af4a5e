//! Backpressure: ingest says so when the delivery side has fallen too far behind.
//!
//! Accepting faster than delivering is fine for a burst, but under sustained overload
//! the work queues would grow without bound and every delivery would arrive later and
//! later. With `ingest_max_backlog` set, a background task reads the depth of every work
//! queue (first attempts and retries, every shard) each [`READ_INTERVAL`], exports the
//! sum as `hookline_delivery_backlog`, and while it is above the limit `Publish` and
//! `PublishBatch` answer `RESOURCE_EXHAUSTED` with a `RetryInfo` before anything is
//! stored. The reading is approximate (a snapshot at most one interval old, messages
//! held by dispatchers not counted), which is what a soft limit needs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hookline_broker::{Broker, QueueName};
use hookline_grpc::status::exhausted_retry_in;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How often the backlog is read.
pub const READ_INTERVAL: Duration = Duration::from_millis(500);

/// How long a refused publisher is told to wait.
const RETRY_IN: Duration = Duration::from_secs(1);

/// The backlog limit of ingest; share as `Arc<BacklogLimit>`.
#[derive(Debug)]
pub struct BacklogLimit {
    /// Most messages waiting in the work queues before publishes are refused.
    limit: u64,
    /// The last reading.
    backlog: AtomicU64,
}

impl BacklogLimit {
    /// A limit of `limit` waiting messages (at least 1).
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            backlog: AtomicU64::new(0),
        })
    }

    /// Records a reading of the backlog.
    pub fn set(&self, backlog: u64) {
        self.backlog.store(backlog, Ordering::Relaxed);
    }

    /// Ok while the last reading is at most the limit; otherwise the status to answer.
    pub fn admit(&self) -> Result<(), Status> {
        let backlog = self.backlog.load(Ordering::Relaxed);
        if backlog <= self.limit {
            return Ok(());
        }
        metrics::counter!("hookline_publishes_refused_total", "reason" => "backlog").increment(1);
        Err(exhausted_retry_in(
            format!(
                "the delivery backlog is {backlog} messages, above this installation's limit of \
                 {} (setting ingest_max_backlog); nothing was stored; retry in {} s",
                self.limit,
                RETRY_IN.as_secs()
            ),
            RETRY_IN,
        ))
    }

    /// Reads the backlog from `broker` every [`READ_INTERVAL`] until `shutdown`.
    pub fn watch(
        self: &Arc<Self>,
        broker: Arc<dyn Broker>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let limit = self.clone();
        tokio::spawn(async move {
            loop {
                if let Some(backlog) = read_backlog(broker.as_ref()).await {
                    limit.set(backlog);
                    metrics::gauge!("hookline_delivery_backlog").set(backlog as f64);
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(READ_INTERVAL) => {}
                }
            }
        })
    }
}

/// Messages waiting in every work queue the dispatchers consume; `None` when a queue
/// could not be read (the last reading then stands).
pub async fn read_backlog(broker: &dyn Broker) -> Option<u64> {
    let shards = broker.consumed_shards().await.ok()?;
    let mut total = 0u64;
    for queue in QueueName::consumed(shards) {
        total = total.saturating_add(broker.queue_depth(queue).await.ok()?);
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn publishes_are_refused_only_above_the_limit() {
        let limit = BacklogLimit::new(100);
        assert!(limit.admit().is_ok());
        limit.set(100);
        assert!(limit.admit().is_ok());
        limit.set(101);
        let refused = limit.admit().unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("ingest_max_backlog"));
        assert!(refused.message().contains("101"));
        let wait = refused.get_details_retry_info().and_then(|r| r.retry_delay);
        assert_eq!(wait, Some(RETRY_IN));
        limit.set(3);
        assert!(limit.admit().is_ok());
    }
}
