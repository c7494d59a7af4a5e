//! Conversion between domain records (`hookline-core`) and wire messages (`hookline.v1`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_core::model;
use hookline_proto::v1 as pb;

use crate::status::invalid;

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Until when subscription `id`'s circuit is open, as recorded by a dispatcher, if that
/// is still ahead: a time already past says nothing (the next request is the probe).
pub async fn circuit_open_until(
    store: &dyn hookline_store::port::RegistryStore,
    id: &hookline_core::Id,
) -> Result<Option<prost_types::Timestamp>, tonic::Status> {
    let until = store
        .circuit_open_until(id)
        .await
        .map_err(crate::status::from_store)?;
    let now = Utc::now();
    Ok(opt_timestamp(until.filter(|t| *t > now)))
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

/// A wire timestamp as a time, or `INVALID_ARGUMENT` naming the field.
pub fn from_timestamp(
    field: &str,
    t: &prost_types::Timestamp,
) -> Result<DateTime<Utc>, tonic::Status> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| invalid(field, "is not a valid timestamp"))
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A wire duration as a non-negative duration, or `INVALID_ARGUMENT` naming the field.
pub fn from_duration(field: &str, d: &prost_types::Duration) -> Result<Duration, tonic::Status> {
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(s), Ok(n)) if n < 1_000_000_000 => Ok(Duration::new(s, n)),
        _ => Err(invalid(field, "must be a non-negative duration")),
    }
}

pub fn tenant(t: model::Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id.into_string(),
        name: t.name,
        metadata: t.metadata,
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
        quotas: Some(tenant_quotas(&t.quotas)),
    }
}

pub fn tenant_quotas(q: &hookline_core::quota::TenantQuotas) -> pb::TenantQuotas {
    pb::TenantQuotas {
        max_subscriptions: q.max_subscriptions.unwrap_or(0),
        max_deliveries_per_event: q.max_deliveries_per_event.unwrap_or(0),
        max_events_per_second: q.max_events_per_second.unwrap_or(0),
        weight: q.weight.unwrap_or(0),
    }
}

/// Quotas from the wire (0 = the server's default), each checked against what is stored.
pub fn from_tenant_quotas(
    field: &str,
    q: &pb::TenantQuotas,
) -> Result<hookline_core::quota::TenantQuotas, tonic::Status> {
    use hookline_core::quota::override_value;
    let one = |name: &str, v: u32| {
        override_value(&format!("{field}.{name}"), v).map_err(crate::status::from_validation)
    };
    Ok(hookline_core::quota::TenantQuotas {
        max_subscriptions: one("max_subscriptions", q.max_subscriptions)?,
        max_deliveries_per_event: one("max_deliveries_per_event", q.max_deliveries_per_event)?,
        max_events_per_second: one("max_events_per_second", q.max_events_per_second)?,
        weight: hookline_core::quota::weight_value(&format!("{field}.weight"), q.weight)
            .map_err(crate::status::from_validation)?,
    })
}

pub fn subscription_state(s: model::SubscriptionState) -> pb::SubscriptionState {
    match s {
        model::SubscriptionState::Enabled => pb::SubscriptionState::Enabled,
        model::SubscriptionState::Disabled => pb::SubscriptionState::Disabled,
    }
}

pub fn payload_format(f: model::PayloadFormat) -> pb::PayloadFormat {
    match f {
        model::PayloadFormat::Raw => pb::PayloadFormat::Raw,
        model::PayloadFormat::Envelope => pb::PayloadFormat::Envelope,
    }
}

/// The model's format for a proto value; unspecified is raw. `field` names it in the error.
pub fn payload_format_from(field: &str, value: i32) -> Result<model::PayloadFormat, tonic::Status> {
    match pb::PayloadFormat::try_from(value) {
        Ok(pb::PayloadFormat::Unspecified | pb::PayloadFormat::Raw) => {
            Ok(model::PayloadFormat::Raw)
        }
        Ok(pb::PayloadFormat::Envelope) => Ok(model::PayloadFormat::Envelope),
        Err(_) => Err(invalid(
            field,
            format!(
                "unknown value {value}; allowed: PAYLOAD_FORMAT_RAW (1), \
                 PAYLOAD_FORMAT_ENVELOPE (2)"
            ),
        )),
    }
}

pub fn ordering(o: model::Ordering) -> pb::Ordering {
    match o {
        model::Ordering::Unordered => pb::Ordering::Unordered,
        model::Ordering::Ordered => pb::Ordering::Ordered,
    }
}

/// The model's ordering for a proto value; unspecified is unordered. `field` names it in
/// the error.
pub fn ordering_from(field: &str, value: i32) -> Result<model::Ordering, tonic::Status> {
    match pb::Ordering::try_from(value) {
        Ok(pb::Ordering::Unspecified | pb::Ordering::Unordered) => Ok(model::Ordering::Unordered),
        Ok(pb::Ordering::Ordered) => Ok(model::Ordering::Ordered),
        Err(_) => Err(invalid(
            field,
            format!("unknown value {value}; allowed: ORDERING_UNORDERED (1), ORDERING_ORDERED (2)"),
        )),
    }
}

pub fn subscription(s: model::Subscription) -> pb::Subscription {
    pb::Subscription {
        id: s.id.into_string(),
        tenant_id: s.tenant_id.into_string(),
        url: s.url,
        description: s.description,
        event_types: s.event_types,
        channels: s.channels,
        // Sensitive values never leave the server (hookline_core::sensitive).
        headers: hookline_core::sensitive::mask_headers(s.headers),
        rate_limit_per_second: s.rate_limit_per_second.unwrap_or(0),
        max_in_flight: s.max_in_flight.unwrap_or(0),
        retry_policy: s.retry_schedule.map(|schedule| pb::RetryPolicy {
            schedule: schedule.into_iter().map(duration).collect(),
        }),
        state: subscription_state(s.state) as i32,
        disabled_reason: s.disabled_reason.unwrap_or_default(),
        metadata: s.metadata,
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
        payload_format: payload_format(s.payload_format) as i32,
        circuit_open_until: None,
        // Filled by the registry (its `security` module), which reads secrets and
        // certificates.
        signature_scheme: 0,
        client_certificate: None,
        ordering: ordering(s.ordering) as i32,
    }
}

pub fn event_type(e: model::EventType) -> pb::EventType {
    pb::EventType {
        name: e.name,
        description: e.description,
        schema: e.schema.unwrap_or_default(),
        archived: e.archived,
        created_at: Some(timestamp(e.created_at)),
        updated_at: Some(timestamp(e.updated_at)),
    }
}

pub fn api_key(k: model::ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.into_string(),
        name: k.name,
        tenant_id: k.tenant_id.map(|t| t.into_string()).unwrap_or_default(),
        token_prefix: k.token_prefix,
        created_at: Some(timestamp(k.created_at)),
        revoked_at: opt_timestamp(k.revoked_at),
    }
}

/// The retry schedule of a wire policy, or `INVALID_ARGUMENT` naming the bad entry.
pub fn retry_schedule(
    field: &str,
    policy: &pb::RetryPolicy,
) -> Result<Vec<Duration>, tonic::Status> {
    policy
        .schedule
        .iter()
        .enumerate()
        .map(|(i, d)| from_duration(&format!("{field}.schedule[{i}]"), d))
        .collect()
}

pub fn event(e: model::Event) -> pb::Event {
    pb::Event {
        id: e.id.into_string(),
        tenant_id: e.tenant_id.into_string(),
        event_type: e.event_type,
        payload: e.payload,
        idempotency_key: e.idempotency_key.unwrap_or_default(),
        channels: e.channels,
        created_at: Some(timestamp(e.created_at)),
    }
}

pub fn delivery_status(s: model::DeliveryStatus) -> pb::DeliveryStatus {
    match s {
        model::DeliveryStatus::Pending => pb::DeliveryStatus::Pending,
        model::DeliveryStatus::Retrying => pb::DeliveryStatus::Retrying,
        model::DeliveryStatus::Succeeded => pb::DeliveryStatus::Succeeded,
        model::DeliveryStatus::Failed => pb::DeliveryStatus::Failed,
    }
}

/// A wire status filter; `Unspecified` means every status.
pub fn from_delivery_status(
    field: &str,
    value: i32,
) -> Result<Option<model::DeliveryStatus>, tonic::Status> {
    match pb::DeliveryStatus::try_from(value) {
        Ok(pb::DeliveryStatus::Unspecified) => Ok(None),
        Ok(pb::DeliveryStatus::Pending) => Ok(Some(model::DeliveryStatus::Pending)),
        Ok(pb::DeliveryStatus::Retrying) => Ok(Some(model::DeliveryStatus::Retrying)),
        Ok(pb::DeliveryStatus::Succeeded) => Ok(Some(model::DeliveryStatus::Succeeded)),
        Ok(pb::DeliveryStatus::Failed) => Ok(Some(model::DeliveryStatus::Failed)),
        Err(_) => Err(invalid(field, format!("{value} is not a delivery status"))),
    }
}

pub fn delivery(d: model::Delivery) -> pb::Delivery {
    pb::Delivery {
        id: d.id.into_string(),
        event_id: d.event_id.into_string(),
        tenant_id: d.tenant_id.into_string(),
        subscription_id: d.subscription_id.into_string(),
        event_type: d.event_type,
        status: delivery_status(d.status) as i32,
        attempt_count: d.attempt_count,
        next_attempt_at: opt_timestamp(d.next_attempt_at),
        last_attempt_at: opt_timestamp(d.last_attempt_at),
        last_status_code: d.last_status_code.map(u32::from).unwrap_or(0),
        last_error: d.last_error.unwrap_or_default(),
        created_at: Some(timestamp(d.created_at)),
        updated_at: Some(timestamp(d.updated_at)),
        deferred_until: d
            .deferred_reason
            .as_ref()
            .and_then(|_| opt_timestamp(d.next_attempt_at)),
        deferred_reason: d.deferred_reason.unwrap_or_default(),
    }
}

pub fn error_class(c: model::ErrorClass) -> pb::ErrorClass {
    match c {
        model::ErrorClass::Timeout => pb::ErrorClass::Timeout,
        model::ErrorClass::Connect => pb::ErrorClass::Connect,
        model::ErrorClass::Dns => pb::ErrorClass::Dns,
        model::ErrorClass::Tls => pb::ErrorClass::Tls,
        model::ErrorClass::Body => pb::ErrorClass::Body,
        model::ErrorClass::Status => pb::ErrorClass::Status,
        model::ErrorClass::Invalid => pb::ErrorClass::Invalid,
        model::ErrorClass::Egress => pb::ErrorClass::Egress,
    }
}

pub fn attempt(a: model::Attempt) -> pb::Attempt {
    pb::Attempt {
        id: a.id.into_string(),
        delivery_id: a.delivery_id.into_string(),
        attempt_number: a.attempt_number,
        started_at: Some(timestamp(a.started_at)),
        duration_ms: a.duration_ms,
        status_code: a.status_code.map(u32::from).unwrap_or(0),
        error_class: a
            .error_class
            .map(error_class)
            .unwrap_or(pb::ErrorClass::Unspecified) as i32,
        error_message: a.error_message.unwrap_or_default(),
        response_excerpt: a.response_excerpt,
    }
}

/// An optional wire timestamp as an optional time.
pub fn opt_from_timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, tonic::Status> {
    t.map(|t| from_timestamp(field, t)).transpose()
}
