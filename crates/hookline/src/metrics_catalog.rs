//! The `# HELP` text and unit of every metric Hookline exports, described once when the
//! Prometheus recorder is installed. The metrics are recorded where they happen (in the
//! service crates); this is the one list an operator reads on `/metrics`. A metric
//! missing here shows up without `# HELP` and fails the `/metrics` end-to-end test.

use hookline_dispatcher::metrics as dispatcher;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Describes every metric to the installed recorder.
pub fn describe_all() {
    describe_gauge!(
        "hookline_build_info",
        "Always 1; the version label names the running build."
    );
    ingest();
    dispatch();
    retry_and_outbox();
    backlogs();
    tls();
}

/// Ingest: events accepted and the deliveries made for them.
fn ingest() {
    describe_counter!(
        "hookline_events_published_total",
        Unit::Count,
        "Events accepted by ingest (stored durably)."
    );
    describe_counter!(
        "hookline_deliveries_created_total",
        Unit::Count,
        "Deliveries created by ingest for the subscriptions that matched published events."
    );
    describe_histogram!(
        "hookline_ingest_group_events",
        Unit::Count,
        "Events committed together in one group commit of ingest."
    );
}

/// The dispatcher: delivery attempts, their timing, and what it put off.
fn dispatch() {
    describe_counter!(
        dispatcher::DELIVERIES_TOTAL,
        Unit::Count,
        "Delivery attempts whose outcome is durable, by outcome (succeeded, retrying, failed)."
    );
    describe_histogram!(
        dispatcher::ATTEMPT_DURATION_SECONDS,
        Unit::Seconds,
        "Time from sending a webhook request to having read its response."
    );
    describe_gauge!(
        dispatcher::IN_FLIGHT,
        "Messages the dispatcher is working on (admission, request, or waiting to record)."
    );
    describe_counter!(
        dispatcher::DEFERRED_TOTAL,
        Unit::Count,
        "Deliveries put off without a request, by reason (in_flight, rate_limit, circuit_open)."
    );
    describe_gauge!(
        dispatcher::CIRCUITS_OPEN,
        "Subscriptions whose circuit is open or half-open in this dispatcher."
    );
    describe_counter!(
        dispatcher::DELIVERIES_BY_SHARD_TOTAL,
        Unit::Count,
        "Messages a dispatcher received, by kind (deliveries, retries) and shard (index, or unsharded)."
    );
    describe_histogram!(
        dispatcher::QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time from publish to receipt by a dispatcher, by queue (deliveries.3): each shard's queueing delay."
    );
}

/// The retry scheduler and the outbox relay.
fn retry_and_outbox() {
    describe_counter!(
        "hookline_retries_enqueued_total",
        Unit::Count,
        "Due retries the scheduler put back on the delivery queue."
    );
    describe_counter!(
        "hookline_outbox_relayed_total",
        Unit::Count,
        "Outbox entries the relay re-published because their publish was not confirmed."
    );
}

/// Gauges read from the store and the broker: queues, backlogs, subscription states.
fn backlogs() {
    describe_gauge!(
        "hookline_queue_depth",
        "Messages ready in each queue (label queue: deliveries, retries, deliveries.<i>, retries.<i>)."
    );
    describe_gauge!(
        "hookline_queue_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest message of each work queue (label queue), where the backend can tell (embedded)."
    );
    describe_gauge!(
        "hookline_delivery_backlog",
        "Messages waiting in the shard queues (both kinds), as ingest's backlog limit read it at its latest publish (only when ingest_max_backlog is set)."
    );
    describe_counter!(
        "hookline_publishes_refused_total",
        Unit::Count,
        "Publish and PublishBatch calls refused with RESOURCE_EXHAUSTED before storing anything (label reason: backlog)."
    );
    describe_gauge!(
        "hookline_retry_backlog",
        "Deliveries scheduled for a later retry."
    );
    describe_gauge!(
        "hookline_retry_oldest_due_age_seconds",
        Unit::Seconds,
        "How long the oldest due retry has been waiting past its time (0 when none is due)."
    );
    describe_gauge!(
        "hookline_outbox_pending",
        "Outbox entries not yet confirmed as published."
    );
    describe_gauge!(
        "hookline_subscriptions",
        "Subscriptions by state (enabled, disabled)."
    );
    describe_counter!(
        "hookline_messages_dead_lettered_total",
        "Messages sent to the dead-letter queue, by reason (e.g. undecodable)."
    );
    describe_counter!(
        "hookline_ordered_skipped_total",
        "Messages of ordered subscriptions acked without an attempt: not the head (a duplicate of a finished delivery, or one waiting its turn)."
    );
    describe_gauge!(
        "hookline_dead_letter_depth",
        "Messages waiting in the dead-letter queue; alert when above 0."
    );
}

/// TLS of the API listeners (crates/hookline-grpc/src/tls.rs).
fn tls() {
    describe_counter!(
        "hookline_tls_handshake_failures_total",
        Unit::Count,
        "TLS handshakes that failed or timed out, by listener (gRPC, REST, admin): \
         plaintext clients, untrusted or missing client certificates."
    );
    describe_counter!(
        "hookline_tls_certificate_reloads_total",
        Unit::Count,
        "Times the API certificate was read again after its files changed (tls_cert, tls_key)."
    );
}
