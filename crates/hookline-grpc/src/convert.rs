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
    }
}

pub fn subscription_state(s: model::SubscriptionState) -> pb::SubscriptionState {
    match s {
        model::SubscriptionState::Enabled => pb::SubscriptionState::Enabled,
        model::SubscriptionState::Disabled => pb::SubscriptionState::Disabled,
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
        headers: s.headers,
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
