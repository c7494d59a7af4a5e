//! Values between the domain and a database column, the same on both adapters: the limits
//! of what can be stored (PostgreSQL's `integer` columns, held to the same range on SQLite so
//! both refuse the same inputs) and the decoding of stored values back into domain types.
//!
//! Decoding failures are `sqlx::Error::ColumnDecode` (the adapters read rows with sqlx and
//! translate its errors once, in their `error` modules); they mean a corrupt row.

use std::time::Duration;

use hookline_core::client_cert::ClientIdentity;
use hookline_core::model::{
    Attempt, DeliveryStatus, ErrorClass, Ordering, PayloadFormat, RESPONSE_EXCERPT_LIMIT,
    SubscriptionSecret, SubscriptionState,
};
use hookline_core::quota::TenantQuotas;
use hookline_core::{Id, IdKind};

use crate::StoreError;

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// A `u32` the store keeps in an `integer` column: more than `i32::MAX` is refused.
fn opt_u32_param(field: &str, value: Option<u32>) -> Result<Option<i32>, StoreError> {
    value
        .map(|v| {
            i32::try_from(v).map_err(|_| {
                StoreError::invalid(
                    field,
                    format!(
                        "is {v}; the largest value that can be stored is {}",
                        i32::MAX
                    ),
                )
            })
        })
        .transpose()
}

/// The limits of a subscription as its columns hold them, checked: the same for a new
/// subscription and an update.
pub(crate) struct SubscriptionLimits {
    pub rate_limit_per_second: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub retry_schedule_ms: Option<Vec<i64>>,
}

impl SubscriptionLimits {
    pub(crate) fn check(
        rate_limit_per_second: Option<u32>,
        max_in_flight: Option<u32>,
        retry_schedule: Option<&[Duration]>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            rate_limit_per_second: opt_u32_param("rate_limit_per_second", rate_limit_per_second)?,
            max_in_flight: opt_u32_param("max_in_flight", max_in_flight)?,
            retry_schedule_ms: retry_schedule_param(retry_schedule)?,
        })
    }
}

/// A tenant's quota overrides as their columns hold them, checked (in column order:
/// `max_subscriptions`, `max_deliveries_per_event`, `max_events_per_second`, `weight`).
pub(crate) fn quota_params(q: &TenantQuotas) -> Result<[Option<i32>; 4], StoreError> {
    Ok([
        opt_u32_param("quotas.max_subscriptions", q.max_subscriptions)?,
        opt_u32_param(
            "quotas.max_deliveries_per_event",
            q.max_deliveries_per_event,
        )?,
        opt_u32_param("quotas.max_events_per_second", q.max_events_per_second)?,
        opt_u32_param("quotas.weight", q.weight)?,
    ])
}

/// A retry schedule as milliseconds; a delay too long for an `i64` of them is refused.
fn retry_schedule_param(schedule: Option<&[Duration]>) -> Result<Option<Vec<i64>>, StoreError> {
    schedule
        .map(|delays| {
            delays
                .iter()
                .map(|d| {
                    i64::try_from(d.as_millis()).map_err(|_| {
                        StoreError::invalid(
                            "retry_schedule",
                            format!("a delay of {} s is too long to be stored", d.as_secs()),
                        )
                    })
                })
                .collect()
        })
        .transpose()
}

/// The `disabled_reason` stored with a state: an enabled subscription has no reason to be
/// disabled.
pub(crate) fn disabled_reason(state: SubscriptionState, reason: Option<&str>) -> Option<&str> {
    match state {
        SubscriptionState::Enabled => None,
        SubscriptionState::Disabled => reason,
    }
}

/// The duration an attempt is stored with. A measurement, not an input to refuse: what an
/// `integer` cannot hold is clamped.
pub(crate) fn stored_duration_ms(attempt: &Attempt) -> i32 {
    i32::try_from(attempt.duration_ms).unwrap_or(i32::MAX)
}

/// The part of an attempt's response body that is stored.
pub(crate) fn stored_excerpt(attempt: &Attempt) -> &[u8] {
    let excerpt = &attempt.response_excerpt;
    &excerpt[..excerpt.len().min(RESPONSE_EXCERPT_LIMIT)]
}

/// A stored count as a `u32`, saturating (a count is never negative).
pub(crate) fn count_u32(count: i64) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Secrets keyed by their subscription (each has at most one current secret).
pub(crate) fn by_subscription(
    secrets: Vec<SubscriptionSecret>,
) -> std::collections::HashMap<Id, SubscriptionSecret> {
    secrets
        .into_iter()
        .map(|s| (s.subscription_id.clone(), s))
        .collect()
}

pub(crate) fn decode_error(column: &str, message: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: message.into(),
    }
}

/// An id of `kind` from its text form: a corrupt row is reported, not a wrong-kind id.
pub(crate) fn id(column: &str, raw: &str, kind: IdKind) -> Result<Id, sqlx::Error> {
    Id::parse(kind, column, raw).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: Box::new(e),
    })
}

pub(crate) fn opt_id(
    column: &str,
    raw: Option<&str>,
    kind: IdKind,
) -> Result<Option<Id>, sqlx::Error> {
    raw.map(|raw| id(column, raw, kind)).transpose()
}

/// An integer column that holds a `u32` (counts, limits, attempt numbers).
pub(crate) fn u32_of(column: &str, raw: i64) -> Result<u32, sqlx::Error> {
    u32::try_from(raw).map_err(|_| decode_error(column, format!("value {raw} out of range")))
}

pub(crate) fn opt_u32_of(column: &str, raw: Option<i64>) -> Result<Option<u32>, sqlx::Error> {
    raw.map(|v| u32_of(column, v)).transpose()
}

pub(crate) fn status_code(column: &str, raw: Option<i64>) -> Result<Option<u16>, sqlx::Error> {
    raw.map(|v| {
        u16::try_from(v).map_err(|_| decode_error(column, format!("status code {v} out of range")))
    })
    .transpose()
}

pub(crate) fn subscription_state(raw: &str) -> Result<SubscriptionState, sqlx::Error> {
    SubscriptionState::parse(raw)
        .ok_or_else(|| decode_error("state", format!("unknown subscription state {raw:?}")))
}

pub(crate) fn delivery_status(raw: &str) -> Result<DeliveryStatus, sqlx::Error> {
    DeliveryStatus::parse(raw)
        .ok_or_else(|| decode_error("status", format!("unknown delivery status {raw:?}")))
}

pub(crate) fn error_class(raw: Option<&str>) -> Result<Option<ErrorClass>, sqlx::Error> {
    raw.map(|raw| {
        ErrorClass::parse(raw)
            .ok_or_else(|| decode_error("error_class", format!("unknown error class {raw:?}")))
    })
    .transpose()
}

pub(crate) fn payload_format(raw: &str) -> Result<PayloadFormat, sqlx::Error> {
    raw.parse().map_err(|e| decode_error("payload_format", e))
}

pub(crate) fn ordering(raw: &str) -> Result<Ordering, sqlx::Error> {
    raw.parse().map_err(|e| decode_error("ordering", e))
}

/// A retry schedule from its milliseconds.
pub(crate) fn retry_schedule(raw: Option<Vec<i64>>) -> Result<Option<Vec<Duration>>, sqlx::Error> {
    raw.map(|ms| {
        ms.into_iter()
            .map(|v| {
                u64::try_from(v).map(Duration::from_millis).map_err(|_| {
                    decode_error("retry_schedule_ms", format!("negative delay {v} ms"))
                })
            })
            .collect()
    })
    .transpose()
}

/// `(subscription_id, certificate_pem, private_key_pem)` rows of
/// `subscription_client_certs` keyed by subscription.
pub(crate) fn client_identities(
    rows: Vec<(String, String, String)>,
) -> Result<std::collections::HashMap<Id, ClientIdentity>, sqlx::Error> {
    rows.into_iter()
        .map(|(sub, certificate_pem, private_key_pem)| {
            let identity = ClientIdentity {
                certificate_pem,
                private_key_pem,
            };
            Ok((id("subscription_id", &sub, IdKind::Subscription)?, identity))
        })
        .collect()
}
