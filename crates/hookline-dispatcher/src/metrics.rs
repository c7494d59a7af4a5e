//! The dispatcher's metrics, named once here (through the `metrics` facade; the binary
//! installs the Prometheus exporter).

use std::time::Duration;

use hookline_store::port::NextStep;

/// Deliveries whose attempt outcome is durable, by `outcome` (succeeded, retrying, failed).
pub const DELIVERIES_TOTAL: &str = "hookline_deliveries_total";
/// Time from sending a request to having read its response excerpt.
pub const ATTEMPT_DURATION_SECONDS: &str = "hookline_attempt_duration_seconds";
/// Messages being worked on (admission, HTTP request, or waiting for room at the writer).
pub const IN_FLIGHT: &str = "hookline_dispatcher_in_flight";
/// Deliveries put off without a request, once durable, by `reason` (`in_flight`,
/// `rate_limit`, `circuit_open`).
pub const DEFERRED_TOTAL: &str = "hookline_deliveries_deferred_total";
/// Subscriptions whose circuit is open or half-open in this dispatcher. A count, not a
/// gauge per subscription: subscription ids as labels would not scale. Which ones are
/// open is in the logs (`circuit opened`, `circuit closed`, with `subscription_id`).
pub const CIRCUITS_OPEN: &str = "hookline_circuits_open";

/// Messages this dispatcher moved to the dead-letter queue itself, by `reason`
/// (`undecodable`). Messages the broker dead-letters past its delivery limit are counted
/// by the `hookline_dead_letter_depth` gauge only.
pub const DEAD_LETTERED_TOTAL: &str = "hookline_messages_dead_lettered_total";

/// Messages received from the work queues, by `kind` (`deliveries`, `retries`) and
/// `shard` (the shard index, or `unsharded`). No tenant in any label.
pub const DELIVERIES_BY_SHARD_TOTAL: &str = "hookline_deliveries_by_shard_total";
/// Time from publish to receipt by a dispatcher of the messages of each work queue, by
/// `queue` (`deliveries.3`): the queueing delay a shard's messages see.
pub const QUEUE_WAIT_SECONDS: &str = "hookline_queue_wait_seconds";

/// Counts what one consumed queue hands over and how long it waited there.
pub(crate) struct ShardReceived {
    counter: metrics::Counter,
    wait: metrics::Histogram,
}

impl ShardReceived {
    pub(crate) fn new(queue: hookline_broker::QueueName) -> Self {
        let shard = queue
            .shard()
            .map_or_else(|| "unsharded".to_owned(), |s| s.to_string());
        Self {
            counter: metrics::counter!(
                DELIVERIES_BY_SHARD_TOTAL,
                "kind" => queue.kind().as_str(),
                "shard" => shard
            ),
            wait: metrics::histogram!(QUEUE_WAIT_SECONDS, "queue" => queue.name()),
        }
    }

    pub(crate) fn record(&self, message: &hookline_broker::ReceivedMessage) {
        self.counter.increment(1);
        if let Some(ms) = hookline_broker::shards::published_ms(&message.headers) {
            let now = chrono::Utc::now().timestamp_millis();
            self.wait
                .record(Duration::from_millis(now.saturating_sub(ms).max(0) as u64).as_secs_f64());
        }
    }
}

pub(crate) fn dead_lettered(reason: &'static str) {
    metrics::counter!(DEAD_LETTERED_TOTAL, "reason" => reason).increment(1);
}

pub(crate) fn attempt_finished(duration: Duration) {
    metrics::histogram!(ATTEMPT_DURATION_SECONDS).record(duration.as_secs_f64());
}

/// Counts outcomes once they are durable.
pub(crate) fn count_delivery_outcome(next: &NextStep) {
    let outcome = match next {
        NextStep::Succeeded => "succeeded",
        NextStep::RetryAt(_) => "retrying",
        NextStep::Failed { .. } => "failed",
    };
    metrics::counter!(DELIVERIES_TOTAL, "outcome" => outcome).increment(1);
}

/// Counts a deferral once it is durable.
pub(crate) fn count_deferral(reason: &'static str) {
    metrics::counter!(DEFERRED_TOTAL, "reason" => reason).increment(1);
}

pub(crate) fn circuits_open(count: i64) {
    metrics::gauge!(CIRCUITS_OPEN).set(count.max(0) as f64);
}

/// Holds one unit of the in-flight gauge while alive.
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn enter() -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}
