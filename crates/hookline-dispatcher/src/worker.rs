//! One delivery message, from the queue to an outcome handed to the writer.
//!
//! Decode the job, find the subscription, get it admitted for its subscription
//! (circuit, in-flight slot, rate: [`crate::limits`]) and then a process-wide permit,
//! sign, POST, tell the circuit breaker how it went, decide what happens next (success,
//! a retry at a time, or failure), and pass the outcome with its message to the writer,
//! which acks once the outcome is durable. A message that is not admitted is deferred
//! the same way: an outcome with no attempt and a retry time. Everything that can go
//! wrong here is input or network trouble, so every branch settles the message or hands
//! it on; nothing panics.
//!
//! Each message is handled in a `dispatcher.deliver` span that lives until its outcome is
//! durable and the message settled (the writer holds it). When spans are exported, a first
//! attempt continues the trace its message headers carry (the publish's), so one trace
//! runs from `Publish` to the receiver's answer; a later attempt starts a trace of its
//! own with a link to that one, so a delivery retried for a day does not keep one trace
//! open. The request itself is the `http.attempt` span ([`crate::http`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_broker::{Broker, ReceivedMessage};
use hookline_core::job::{self, DeliveryJob};
use hookline_core::model::{Attempt, ErrorClass, RegistryChange, SubscriptionState};
use hookline_core::retry::parse_retry_after;
use hookline_core::signing::signature_header;
use hookline_core::{Id, IdKind};
use hookline_store::port::{AttemptOutcome, NextStep, RegistryStore};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

use crate::body;
use crate::cache::{Endpoint, Lookup, SubscriptionCache};
use crate::circuit::Health;
use crate::clients::Clients;
use crate::fair::{FairPermit, FairPermits};
use crate::http::{self, Exchange};
use crate::limits::{Decision, DeferReason, Limits, Ticket};
use crate::metrics;
use crate::writer::{Settle, settled};

/// How long to hold a message before putting it back when the registry cannot be read,
/// so a database outage does not spin messages through the queue.
const STORE_TROUBLE_PAUSE: Duration = Duration::from_secs(1);

pub(crate) const DISABLED_REASON: &str = "subscription is disabled";
pub(crate) const GONE_REASON: &str = "endpoint answered 410 Gone";

/// What every delivery task shares.
pub(crate) struct Worker {
    /// The HTTP clients, one per client certificate presented.
    pub(crate) clients: Arc<Clients>,
    pub(crate) cache: Arc<SubscriptionCache>,
    pub(crate) registry: Arc<dyn RegistryStore>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) writer: mpsc::Sender<Settle>,
    pub(crate) shutdown: CancellationToken,
    /// Per-subscription admission, taken before a permit.
    pub(crate) limits: Limits,
    /// The process-wide cap on requests in flight (`concurrency`), granted round robin
    /// over the consumed queues.
    pub(crate) permits: Arc<FairPermits>,
}

impl Worker {
    /// Handles one message to the point where it is settled or with the writer.
    /// `lane` is the consumed queue it came from (for fair permits).
    pub(crate) async fn handle(&self, mut message: ReceivedMessage, lane: usize) {
        let body = std::mem::take(&mut message.body);
        let job = match DeliveryJob::from_message(&message.headers, body) {
            Ok(job) => job,
            Err(e) => {
                self.dead_letter_poison(message, &e.to_string()).await;
                return;
            }
        };
        let span = tracing::info_span!(
            parent: None,
            "dispatcher.deliver",
            otel.kind = "consumer",
            otel.status_code = Empty,
            delivery_id = %job.delivery_id,
            subscription_id = %job.subscription_id,
            attempt = job.attempt_number,
            outcome = Empty,
        );
        if hookline_telemetry::exporting() {
            connect_trace(&span, &job, &message);
        }
        self.deliver(job, message, lane).instrument(span).await;
    }

    /// Parks a message that can never be delivered in the dead-letter queue, saying
    /// which ids it carries (whichever headers it has) so an operator can find it.
    async fn dead_letter_poison(&self, message: ReceivedMessage, error: &str) {
        let header = |name: &str| message.headers.get(name).map_or("-", String::as_str);
        tracing::error!(
            error,
            delivery_id = header(job::H_DELIVERY),
            event_id = header(job::H_EVENT),
            tenant_id = header(job::H_TENANT),
            subscription_id = header(job::H_SUBSCRIPTION),
            attempt = header(job::H_ATTEMPT),
            redelivered = message.redelivered,
            "undecodable message moved to the dead-letter queue"
        );
        metrics::dead_lettered("undecodable");
        settled("dead-letter", message.dead_letter().await);
    }

    async fn deliver(&self, job: DeliveryJob, message: ReceivedMessage, lane: usize) {
        let endpoint = match self.cache.get(&job.tenant_id, &job.subscription_id).await {
            Ok(Lookup::Found(endpoint)) => endpoint,
            Ok(Lookup::Gone) => {
                tracing::debug!("subscription is gone with its deliveries; dropping the message");
                note_on_span("dropped");
                settled("ack", message.ack().await);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the subscription; putting the message back");
                tokio::select! {
                    () = self.shutdown.cancelled() => {}
                    () = tokio::time::sleep(STORE_TROUBLE_PAUSE) => {}
                }
                return self.put_back(message).await;
            }
        };

        if endpoint.subscription.state == SubscriptionState::Disabled {
            let outcome = AttemptOutcome {
                delivery_id: job.delivery_id.clone(),
                attempt: None,
                next: NextStep::Failed {
                    reason: DISABLED_REASON.to_owned(),
                },
                deferred_reason: None,
            };
            return self.hand_over(outcome, message, None).await;
        }

        // The subscription's own gates first, so a message that cannot go never holds
        // a process-wide permit.
        let ticket = match self
            .limits
            .admit(&endpoint.subscription, &self.shutdown)
            .await
        {
            Decision::Go(ticket) => ticket,
            Decision::Defer { reason, at } => {
                tracing::debug!(reason = reason.as_str(), %at, "delivery deferred");
                return self.defer(&job, reason, at, message).await;
            }
            Decision::Stopped => return self.put_back(message).await,
        };
        let permit = tokio::select! {
            biased;
            permit = self.permits.acquire(lane) => Some(permit),
            () = self.shutdown.cancelled() => None,
        };
        let Some(permit) = permit else {
            drop(ticket);
            return self.put_back(message).await;
        };
        let outcome = self.send(job, &endpoint, ticket, permit).await;
        self.hand_over(outcome, message, None).await;
    }

    /// Makes the attempt admitted by `ticket` and `permit` and decides what comes next.
    async fn send(
        &self,
        mut job: DeliveryJob,
        endpoint: &Endpoint,
        ticket: Ticket,
        permit: FairPermit,
    ) -> AttemptOutcome {
        let started_at = Utc::now();
        let payload = std::mem::take(&mut job.payload);
        let exchange = self.attempt(&job, payload, endpoint, started_at).await;
        ticket.finish(health(&exchange));
        drop(permit);
        if exchange.sent {
            metrics::attempt_finished(exchange.duration);
        }
        let next = self.decide(&job, endpoint, &exchange).await;
        match (&exchange.status, &exchange.error) {
            (Some(status), _) => tracing::debug!(%status, ?next, "attempt answered"),
            (None, Some((class, error))) => {
                tracing::debug!(class = class.as_str(), %error, ?next, "attempt failed")
            }
            (None, None) => {}
        }
        AttemptOutcome {
            delivery_id: job.delivery_id.clone(),
            attempt: Some(attempt_record(&job, exchange)),
            next,
            deferred_reason: None,
        }
    }

    /// Puts the message back on its queue with nothing recorded: the registry could
    /// not be read, or the worker is stopping. It is delivered again later.
    async fn put_back(&self, message: ReceivedMessage) {
        note_on_span("requeued");
        settled("requeue", message.retry_later().await);
    }

    /// Puts the delivery off until `at` without an attempt: the retry scheduler queues
    /// it again then, with the same attempt number.
    async fn defer(
        &self,
        job: &DeliveryJob,
        reason: DeferReason,
        at: DateTime<Utc>,
        message: ReceivedMessage,
    ) {
        let outcome = AttemptOutcome {
            delivery_id: job.delivery_id.clone(),
            attempt: None,
            next: NextStep::RetryAt(at),
            deferred_reason: Some(reason.as_str().to_owned()),
        };
        self.hand_over(outcome, message, Some(reason)).await;
    }

    /// Signs and sends one request with `payload` (the job's, moved out of it).
    async fn attempt(
        &self,
        job: &DeliveryJob,
        payload: Vec<u8>,
        endpoint: &Endpoint,
        started_at: DateTime<Utc>,
    ) -> Exchange {
        let url = match &endpoint.url {
            Ok(url) => url.clone(),
            Err(e) => return Exchange::refused(started_at, e.clone()),
        };
        let keys = endpoint.keys_at(started_at);
        if keys.is_empty() {
            return Exchange::refused(
                started_at,
                "the subscription has no live signing secret".to_owned(),
            );
        }
        let msg_id = job.event_id.to_string();
        let timestamp = started_at.timestamp();
        // The signature covers the body actually sent.
        let payload = body::build(endpoint.subscription.payload_format, job, payload);
        let signature = signature_header(&keys, &msg_id, timestamp, &payload);
        let mut headers = endpoint.headers.clone();
        // Ids, digits, base64 and validated event types are always valid header values; a
        // failure would be a bug, reported as a refused attempt rather than a panic.
        match (
            HeaderValue::from_str(&msg_id),
            HeaderValue::from_str(&signature),
            HeaderValue::from_str(&job.event_type),
        ) {
            (Ok(id), Ok(sig), Ok(event_type)) => {
                headers.insert("webhook-id", id);
                headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
                headers.insert("webhook-signature", sig);
                headers.insert(body::EVENT_TYPE_HEADER, event_type);
            }
            _ => {
                return Exchange::refused(
                    started_at,
                    "cannot build the signature headers".to_owned(),
                );
            }
        }
        let client = match self.clients.get(endpoint.identity.as_ref()) {
            Ok(client) => client,
            Err(e) => return Exchange::refused(started_at, e),
        };
        http::post(&client, url, headers, payload, started_at).await
    }

    /// What happens to the delivery after this attempt. A 410 also disables the
    /// subscription.
    async fn decide(
        &self,
        job: &DeliveryJob,
        endpoint: &Endpoint,
        exchange: &Exchange,
    ) -> NextStep {
        match exchange.status {
            Some(status) if status.is_success() => return NextStep::Succeeded,
            Some(StatusCode::GONE) => {
                self.disable_gone(endpoint).await;
                return NextStep::Failed {
                    reason: format!("{GONE_REASON}; subscription disabled"),
                };
            }
            _ => {}
        }
        let now = Utc::now();
        let retry_after = match exchange.status {
            Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) => exchange
                .retry_after
                .as_deref()
                .and_then(|v| parse_retry_after(v, now)),
            _ => None,
        };
        let next_at =
            endpoint
                .policy
                .next_attempt_at(job.attempt_number, now, retry_after, &mut rand::rng());
        match next_at {
            Some(at) => NextStep::RetryAt(at),
            None => NextStep::Failed {
                reason: format!("retry schedule spent after {} attempts", job.attempt_number),
            },
        }
    }

    /// Disables a subscription whose endpoint answered 410 Gone and tells every cache.
    async fn disable_gone(&self, endpoint: &Endpoint) {
        let sub = &endpoint.subscription;
        match self
            .registry
            .set_subscription_state(&sub.id, SubscriptionState::Disabled, Some(GONE_REASON))
            .await
        {
            Ok(_) => {
                tracing::warn!(subscription_id = %sub.id, url = %sub.url, "endpoint answered 410 Gone; subscription disabled");
                let change = RegistryChange::Subscription {
                    tenant_id: sub.tenant_id.clone(),
                    subscription_id: sub.id.clone(),
                };
                if let Err(e) = hookline_changes::announce(self.broker.as_ref(), &change).await {
                    tracing::warn!(error = %e, "cannot announce the disabled subscription; caches expire on their own");
                }
            }
            Err(e) => {
                tracing::warn!(subscription_id = %sub.id, error = %e, "endpoint answered 410 Gone but the subscription could not be disabled");
            }
        }
        self.cache.invalidate_subscription(&sub.id).await;
    }

    /// Passes the outcome to the writer, waiting for room (backpressure).
    async fn hand_over(
        &self,
        outcome: AttemptOutcome,
        message: ReceivedMessage,
        deferred: Option<DeferReason>,
    ) {
        let span = tracing::Span::current();
        note_on_span(match (&outcome.next, deferred) {
            (_, Some(_)) => "deferred",
            (NextStep::Succeeded, None) => "succeeded",
            (NextStep::RetryAt(_), None) => "retry",
            (NextStep::Failed { .. }, None) => "failed",
        });
        if matches!(outcome.next, NextStep::Failed { .. }) {
            span.record("otel.status_code", "ERROR");
        }
        let settle = Settle {
            outcome,
            message,
            deferred,
            span,
        };
        if self.writer.send(settle).await.is_err() {
            // The writer is gone (shutting down): the message is dropped unsettled and
            // redelivered, so the attempt will be made again.
            tracing::warn!("outcome writer has stopped; the message will be redelivered");
        }
    }
}

/// Connects a delivery's span to the trace its message carries: the parent of a first
/// attempt, a link from a later one. Also the attributes that only the trace wants.
fn connect_trace(span: &tracing::Span, job: &DeliveryJob, message: &ReceivedMessage) {
    let origin = hookline_telemetry::extract(&message.headers);
    if job.attempt_number <= 1 {
        hookline_telemetry::set_parent(span, origin);
    } else {
        hookline_telemetry::link_to(span, &origin);
    }
    hookline_telemetry::set_attribute(span, "messaging.operation.type", "process");
    hookline_telemetry::set_attribute(span, "event_id", job.event_id.to_string());
    hookline_telemetry::set_attribute(span, "tenant_id", job.tenant_id.to_string());
    hookline_telemetry::set_attribute(span, "event_type", job.event_type.clone());
}

/// Notes what became of the delivery on its span (the `outcome` field); what is durable
/// is recorded by the store (`DeliveryStore::record_outcomes`), what is counted by `metrics`.
fn note_on_span(outcome: &'static str) {
    tracing::Span::current().record("outcome", outcome);
}

/// What an exchange says about the endpoint's health, for the circuit breaker: a 5xx or
/// no answer at all is down; any other answer is up (the endpoint is there, and a 429 has
/// `Retry-After` for its own purposes); an attempt refused before sending says nothing.
fn health(exchange: &Exchange) -> Health {
    match (exchange.status, &exchange.error) {
        (Some(status), _) if status.is_server_error() => Health::Down,
        (Some(_), _) => Health::Up,
        (None, Some((ErrorClass::Invalid | ErrorClass::Egress, _))) => Health::Unknown,
        (None, _) if exchange.sent => Health::Down,
        (None, _) => Health::Unknown,
    }
}

/// The attempt to record.
fn attempt_record(job: &DeliveryJob, exchange: Exchange) -> Attempt {
    let (error_class, error_message) = match exchange.error {
        Some((class, message)) => (Some(class), Some(message)),
        None => (None, None),
    };
    Attempt {
        id: Id::new(IdKind::Attempt),
        delivery_id: job.delivery_id.clone(),
        attempt_number: job.attempt_number,
        started_at: exchange.started_at,
        duration_ms: u32::try_from(exchange.duration.as_millis()).unwrap_or(u32::MAX),
        status_code: exchange.status.map(|s| s.as_u16()),
        error_class,
        error_message,
        response_excerpt: exchange.excerpt,
    }
}
