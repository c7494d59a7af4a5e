//! A delivery job: what travels through the queue for one attempt of one delivery.
//!
//! The body is the event payload exactly as published; everything else rides in message
//! headers. The dispatcher therefore needs no database read per delivery for the event
//! (the subscription comes from its cache).
//!
//! A job may also carry the W3C `traceparent` of the publish that created its delivery
//! (stored with the delivery, so jobs rebuilt from the database for retries carry it too),
//! in the standard `traceparent` header where tracing tools expect it. The outbox may
//! replace that header with a later span of the same trace; the dispatcher makes a first
//! attempt a child of it and links a retry to it.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::id::{Id, IdKind};

/// One attempt to make: which delivery, of which event, to which subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryJob {
    pub delivery_id: Id,
    pub event_id: Id,
    pub tenant_id: Id,
    pub subscription_id: Id,
    pub event_type: String,
    /// The attempt this job makes: 1 for the first.
    pub attempt_number: u32,
    /// The event payload exactly as published.
    pub payload: Vec<u8>,
    /// The W3C `traceparent` of the publish that created the delivery, when it was traced.
    pub traceparent: Option<String>,
}

pub const H_DELIVERY: &str = "hl-delivery-id";
pub const H_EVENT: &str = "hl-event-id";
pub const H_TENANT: &str = "hl-tenant-id";
pub const H_SUBSCRIPTION: &str = "hl-subscription-id";
pub const H_EVENT_TYPE: &str = "hl-event-type";
pub const H_ATTEMPT: &str = "hl-attempt";
/// The W3C trace context header (lower case, as RabbitMQ tooling and OpenTelemetry use it).
pub const H_TRACEPARENT: &str = "traceparent";

/// Why a queue message is not a delivery job (it goes to the dead-letter queue).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not a delivery job: {0}")]
pub struct JobError(pub String);

impl DeliveryJob {
    /// The message headers of this job.
    pub fn headers(&self) -> BTreeMap<String, String> {
        let mut headers = BTreeMap::from([
            (H_DELIVERY.to_string(), self.delivery_id.to_string()),
            (H_EVENT.to_string(), self.event_id.to_string()),
            (H_TENANT.to_string(), self.tenant_id.to_string()),
            (H_SUBSCRIPTION.to_string(), self.subscription_id.to_string()),
            (H_EVENT_TYPE.to_string(), self.event_type.clone()),
            (H_ATTEMPT.to_string(), self.attempt_number.to_string()),
        ]);
        if let Some(traceparent) = &self.traceparent {
            headers.insert(H_TRACEPARENT.to_string(), traceparent.clone());
        }
        headers
    }

    /// Reads a job back from message headers and body.
    pub fn from_message(
        headers: &BTreeMap<String, String>,
        body: Vec<u8>,
    ) -> Result<Self, JobError> {
        let get = |name: &str| {
            headers
                .get(name)
                .ok_or_else(|| JobError(format!("header {name} is missing")))
        };
        let id = |kind: IdKind, name: &str| -> Result<Id, JobError> {
            Id::parse(kind, name, get(name)?).map_err(|e| JobError(e.to_string()))
        };
        Ok(DeliveryJob {
            delivery_id: id(IdKind::Delivery, H_DELIVERY)?,
            event_id: id(IdKind::Event, H_EVENT)?,
            tenant_id: id(IdKind::Tenant, H_TENANT)?,
            subscription_id: id(IdKind::Subscription, H_SUBSCRIPTION)?,
            event_type: get(H_EVENT_TYPE)?.clone(),
            attempt_number: get(H_ATTEMPT)?
                .parse()
                .map_err(|_| JobError(format!("header {H_ATTEMPT} is not a number")))?,
            payload: body,
            // Optional, and only ever handed to the trace propagator, which ignores a
            // malformed value: an empty one is as good as none.
            traceparent: headers
                .get(H_TRACEPARENT)
                .filter(|v| !v.is_empty())
                .cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_through_headers() {
        let job = DeliveryJob {
            delivery_id: Id::new(IdKind::Delivery),
            event_id: Id::new(IdKind::Event),
            tenant_id: Id::new(IdKind::Tenant),
            subscription_id: Id::new(IdKind::Subscription),
            event_type: "invoice.paid".into(),
            attempt_number: 3,
            payload: br#"{"a":1}"#.to_vec(),
            traceparent: None,
        };
        let headers = job.headers();
        assert!(!headers.contains_key(H_TRACEPARENT));
        let back = DeliveryJob::from_message(&headers, job.payload.clone()).unwrap();
        assert_eq!(back, job);

        let traced = DeliveryJob {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            ..job
        };
        let headers = traced.headers();
        assert_eq!(headers.get(H_TRACEPARENT), traced.traceparent.as_ref());
        let back = DeliveryJob::from_message(&headers, traced.payload.clone()).unwrap();
        assert_eq!(back, traced);
    }

    #[test]
    fn a_missing_or_bad_header_is_an_error() {
        let mut h = BTreeMap::new();
        assert!(DeliveryJob::from_message(&h, vec![]).is_err());
        h.insert(H_DELIVERY.to_string(), "nope".to_string());
        let e = DeliveryJob::from_message(&h, vec![]).unwrap_err();
        assert!(e.to_string().contains(H_DELIVERY));
    }
}
