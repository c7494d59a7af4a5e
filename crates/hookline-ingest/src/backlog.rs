//! Backpressure: ingest says so when the delivery side has fallen too far behind.
//!
//! Accepting faster than delivering is fine for a burst, but under sustained overload
//! the work queues would grow without bound and every delivery would arrive later and
//! later. With `ingest_max_backlog` set, `Publish` and `PublishBatch` answer
//! `RESOURCE_EXHAUSTED` with a `RetryInfo`, before anything is stored, while the backlog
//! of the shard queues (both kinds) is above the limit. The backlog is the one the shard
//! router already keeps for routing ([`Broker::known_backlog`]: a depth snapshot at most
//! [`hookline_broker::shards::REFRESH_INTERVAL`] old plus what this process published
//! since), so the check reads memory, not the broker; it is approximate (messages held
//! by dispatchers are not counted), which is what a soft limit needs.

use std::sync::Arc;
use std::time::Duration;

use hookline_broker::Broker;
use hookline_grpc::status::exhausted_retry_in;
use tonic::Status;

/// How long a refused publisher is told to wait.
const RETRY_IN: Duration = Duration::from_secs(1);

/// The backlog limit of ingest.
pub struct BacklogLimit {
    /// Most messages waiting in the work queues before publishes are refused.
    limit: u64,
    /// Where the backlog is read (the process's shard router).
    broker: Arc<dyn Broker>,
}

impl std::fmt::Debug for BacklogLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BacklogLimit")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl BacklogLimit {
    /// A limit of `limit` waiting messages (at least 1) on what `broker` knows.
    pub fn new(limit: u64, broker: Arc<dyn Broker>) -> Self {
        Self {
            limit: limit.max(1),
            broker,
        }
    }

    /// Ok while the backlog is at most the limit; otherwise the status to answer.
    pub fn admit(&self) -> Result<(), Status> {
        let backlog = self.broker.known_backlog().unwrap_or(0);
        metrics::gauge!("hookline_delivery_backlog").set(backlog as f64);
        check(backlog, self.limit)
    }
}

/// The rule: refused above the limit, with the reading, the setting and when to retry.
fn check(backlog: u64, limit: u64) -> Result<(), Status> {
    if backlog <= limit {
        return Ok(());
    }
    metrics::counter!("hookline_publishes_refused_total", "reason" => "backlog").increment(1);
    Err(exhausted_retry_in(
        format!(
            "the delivery backlog is {backlog} messages, above this installation's limit of \
             {limit} (setting ingest_max_backlog); nothing was stored; retry in {} s",
            RETRY_IN.as_secs()
        ),
        RETRY_IN,
    ))
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn publishes_are_refused_only_above_the_limit() {
        assert!(check(0, 100).is_ok());
        assert!(check(100, 100).is_ok());
        let refused = check(101, 100).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("ingest_max_backlog"));
        assert!(refused.message().contains("101"));
        let wait = refused.get_details_retry_info().and_then(|r| r.retry_delay);
        assert_eq!(wait, Some(RETRY_IN));
        assert!(check(3, 100).is_ok());
    }
}
