//! The records Hookline keeps, shared by the storage port, the services and the API mapping.
//!
//! These are plain data: validation lives in `validate`, persistence in `hookline-store`,
//! wire formats in `hookline-proto`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::Id;
use crate::quota::TenantQuotas;

/// One customer of the user's SaaS. Everything else belongs to exactly one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: Id,
    pub name: String,
    pub metadata: BTreeMap<String, String>,
    /// The tenant's own quotas, set by an admin; unset ones are the server's defaults.
    #[serde(default)]
    pub quotas: TenantQuotas,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Whether a subscription receives deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubscriptionState {
    Enabled,
    Disabled,
}

impl SubscriptionState {
    pub const fn as_str(self) -> &'static str {
        match self {
            SubscriptionState::Enabled => "enabled",
            SubscriptionState::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(SubscriptionState::Enabled),
            "disabled" => Some(SubscriptionState::Disabled),
            _ => None,
        }
    }
}

/// What the body of a request to a subscription is: the payload as published, or the
/// Standard Webhooks envelope `{"type", "timestamp", "data"}` around it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadFormat {
    #[default]
    Raw,
    Envelope,
}

impl PayloadFormat {
    pub const fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Raw => "raw",
            PayloadFormat::Envelope => "envelope",
        }
    }
}

impl std::str::FromStr for PayloadFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(PayloadFormat::Raw),
            "envelope" => Ok(PayloadFormat::Envelope),
            _ => Err(format!(
                "unknown payload format {s:?}; expected raw or envelope"
            )),
        }
    }
}

/// Whether a subscription's deliveries are attempted one at a time in publish order
/// (`Ordered`) or independently, in parallel (`Unordered`, the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ordering {
    #[default]
    Unordered,
    Ordered,
}

impl Ordering {
    pub const fn as_str(self) -> &'static str {
        match self {
            Ordering::Unordered => "unordered",
            Ordering::Ordered => "ordered",
        }
    }

    pub const fn is_ordered(self) -> bool {
        matches!(self, Ordering::Ordered)
    }
}

impl std::str::FromStr for Ordering {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unordered" => Ok(Ordering::Unordered),
            "ordered" => Ok(Ordering::Ordered),
            _ => Err(format!(
                "unknown ordering {s:?}; expected unordered or ordered"
            )),
        }
    }
}

/// An endpoint of a tenant and what it wants delivered to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: Id,
    pub tenant_id: Id,
    pub url: String,
    pub description: String,
    /// Event-type filters (`invoice.paid`, `invoice.*`); empty means every event type.
    pub event_types: Vec<String>,
    /// Channels; empty means events of every channel (and of none).
    pub channels: Vec<String>,
    /// Extra HTTP headers sent with every request.
    pub headers: BTreeMap<String, String>,
    /// At most this many requests per second to this endpoint; `None` means no limit.
    pub rate_limit_per_second: Option<u32>,
    /// At most this many requests in flight to this endpoint; `None` means no limit.
    pub max_in_flight: Option<u32>,
    /// Delays before each retry; `None` means the default schedule.
    pub retry_schedule: Option<Vec<Duration>>,
    pub state: SubscriptionState,
    /// Why the subscription was disabled (by a person, by `410 Gone`, by sustained failure).
    pub disabled_reason: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The body sent: the raw payload or the Standard Webhooks envelope.
    #[serde(default)]
    pub payload_format: PayloadFormat,
    /// Ordered: one delivery at a time, in publish order (see docs/ARCHITECTURE.md).
    #[serde(default)]
    pub ordering: Ordering,
}

/// A signing secret of a subscription. Several are live during a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionSecret {
    pub id: Id,
    pub subscription_id: Id,
    /// `whsec_` + base64 of the key bytes.
    pub secret: String,
    pub created_at: DateTime<Utc>,
    /// When a rotated-out secret stops being used; `None` for the current one.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A named kind of event in the catalogue (`invoice.paid`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventType {
    pub name: String,
    pub description: String,
    /// An optional JSON Schema describing the payload, as JSON text.
    pub schema: Option<String>,
    pub archived: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An API key. Only the SHA-256 of its token is ever stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: Id,
    pub name: String,
    /// `None` for an admin key, which may act on every tenant.
    pub tenant_id: Option<Id>,
    /// The first characters of the token, so a person can tell keys apart.
    pub token_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// One thing that happened, published once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: Id,
    pub tenant_id: Id,
    pub event_type: String,
    /// The JSON exactly as published.
    pub payload: Vec<u8>,
    pub channels: Vec<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryStatus {
    /// Waiting for an attempt (the first, or one a retry has re-enqueued).
    Pending,
    /// The last attempt failed; the next one is scheduled.
    Retrying,
    /// A receiver answered 2xx.
    Succeeded,
    /// The retry schedule is spent, or the subscription is gone; kept and replayable.
    Failed,
}

impl DeliveryStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "retrying" => Some(DeliveryStatus::Retrying),
            "succeeded" => Some(DeliveryStatus::Succeeded),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// `Delivery::deferred_reason` values: why a dispatcher put a delivery off without an
/// attempt.
pub mod deferral {
    /// The subscription's circuit breaker is open.
    pub const CIRCUIT_OPEN: &str = "circuit_open";
    /// The subscription's in-flight limit is reached.
    pub const IN_FLIGHT: &str = "in_flight";
    /// The subscription's rate limit is reached.
    pub const RATE_LIMIT: &str = "rate_limit";
}

/// One event on its way to one subscription. Its id is stable across retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: Id,
    pub event_id: Id,
    pub tenant_id: Id,
    pub subscription_id: Id,
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempt_count: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why the delivery was last put off without an attempt (`circuit_open`,
    /// `in_flight`, `rate_limit`); it runs again at `next_attempt_at`. `None` once an
    /// attempt is recorded or the delivery is queued again.
    #[serde(default)]
    pub deferred_reason: Option<String>,
}

/// Why an attempt got no HTTP answer, or what was wrong with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    Timeout,
    Connect,
    Dns,
    Tls,
    Body,
    /// An HTTP answer that is not 2xx.
    Status,
    /// Refused before any request: bad URL, subscription gone.
    Invalid,
    /// Refused before any connection by the egress policy: the URL's host is, or
    /// resolves only to, an address the operator does not let tenants reach.
    Egress,
}

impl ErrorClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Timeout => "timeout",
            ErrorClass::Connect => "connect",
            ErrorClass::Dns => "dns",
            ErrorClass::Tls => "tls",
            ErrorClass::Body => "body",
            ErrorClass::Status => "status",
            ErrorClass::Invalid => "invalid",
            ErrorClass::Egress => "egress",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "timeout" => ErrorClass::Timeout,
            "connect" => ErrorClass::Connect,
            "dns" => ErrorClass::Dns,
            "tls" => ErrorClass::Tls,
            "body" => ErrorClass::Body,
            "status" => ErrorClass::Status,
            "invalid" => ErrorClass::Invalid,
            "egress" => ErrorClass::Egress,
            _ => return None,
        })
    }
}

/// One HTTP request of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub id: Id,
    pub delivery_id: Id,
    /// 1 for the first attempt.
    pub attempt_number: u32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u32,
    pub status_code: Option<u16>,
    pub error_class: Option<ErrorClass>,
    pub error_message: Option<String>,
    /// At most [`crate::model::RESPONSE_EXCERPT_LIMIT`] bytes of the response body.
    pub response_excerpt: Vec<u8>,
}

/// The most of a response body an attempt keeps.
pub const RESPONSE_EXCERPT_LIMIT: usize = 4 * 1024;

/// A change in the registry, announced on the broker's fanout exchange so that caches
/// in ingest and dispatcher drop what it makes stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RegistryChange {
    Tenant { tenant_id: Id },
    Subscription { tenant_id: Id, subscription_id: Id },
    ApiKey { api_key_id: Id },
    EventType { name: String },
}
