//! What a receiver gets besides the signature: the body in the subscription's payload
//! format and the event type in a header.
//!
//! Raw (the default) sends the payload exactly as published. Envelope wraps it in the
//! Standard Webhooks envelope `{"type", "timestamp", "data"}`; `data` is the payload's
//! bytes unchanged (it was checked as JSON at publish), so nothing is re-encoded. The
//! signature is computed over the body built here, the one actually sent. The event type
//! goes in [`EVENT_TYPE_HEADER`] in both formats; that header is Hookline's, not part of
//! the standard (docs/RECEIVING.md).

use chrono::SecondsFormat;
use hookline_core::job::DeliveryJob;
use hookline_core::model::PayloadFormat;

/// The header naming the event type (`invoice.paid`), sent with every request.
pub(crate) const EVENT_TYPE_HEADER: &str = "webhook-event-type";

/// The request body for `job` in `format`; `payload` is the job's, moved out of it.
pub(crate) fn build(format: PayloadFormat, job: &DeliveryJob, payload: Vec<u8>) -> Vec<u8> {
    match format {
        PayloadFormat::Raw => payload,
        PayloadFormat::Envelope => envelope(job, &payload),
    }
}

/// `{"type":…,"timestamp":…,"data":<payload>}`. The timestamp is when the event was
/// accepted (the time in its id), in RFC 3339 UTC with milliseconds.
fn envelope(job: &DeliveryJob, payload: &[u8]) -> Vec<u8> {
    let accepted = job.event_id.created_at().unwrap_or_else(chrono::Utc::now);
    // Strings through serde_json, so every escape is right whatever the event type holds.
    let kind = serde_json::Value::from(job.event_type.as_str()).to_string();
    let timestamp = accepted.to_rfc3339_opts(SecondsFormat::Millis, true);
    let data: &[u8] = if payload.is_empty() { b"null" } else { payload };
    let head = format!(r#"{{"type":{kind},"timestamp":"{timestamp}","data":"#);
    let mut body = Vec::with_capacity(head.len() + data.len() + 1);
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(data);
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_core::{Id, IdKind};

    fn job(event_type: &str) -> DeliveryJob {
        DeliveryJob {
            delivery_id: Id::new(IdKind::Delivery),
            event_id: Id::new(IdKind::Event),
            tenant_id: Id::new(IdKind::Tenant),
            subscription_id: Id::new(IdKind::Subscription),
            event_type: event_type.to_owned(),
            attempt_number: 1,
            payload: Vec::new(),
            traceparent: None,
        }
    }

    #[test]
    fn raw_is_the_payload_unchanged() {
        let payload = br#"{ "a" : 1 }"#.to_vec();
        assert_eq!(
            build(PayloadFormat::Raw, &job("x"), payload.clone()),
            payload
        );
    }

    #[test]
    fn envelope_wraps_the_payload_bytes_unchanged() {
        let job = job("invoice.\"paid\"");
        let body = build(
            PayloadFormat::Envelope,
            &job,
            br#"{ "amount" : 5 }"#.to_vec(),
        );
        let text = String::from_utf8(body).unwrap();
        let at = job.event_id.created_at().unwrap();
        let at = at.to_rfc3339_opts(SecondsFormat::Millis, true);
        assert!(at.ends_with('Z'), "{at}");
        assert_eq!(
            text,
            format!(
                r#"{{"type":"invoice.\"paid\"","timestamp":"{at}","data":{{ "amount" : 5 }}}}"#
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["data"]["amount"], 5);
    }
}
