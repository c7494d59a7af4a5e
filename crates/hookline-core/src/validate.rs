//! Input rules, checked before anything is stored.
//!
//! Each check returns a [`ValidationError`] naming the field, what was wrong and what is
//! allowed, so that the gRPC layer can answer `INVALID_ARGUMENT` with a message a person
//! can act on.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use crate::retry::{MAX_SCHEDULE_DELAY, MAX_SCHEDULE_LEN};

/// A field that breaks a rule.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error for a field nested under `outer` (`events[3]` + `payload`).
    pub fn within(mut self, outer: &str) -> Self {
        self.field = format!("{outer}.{}", self.field);
        self
    }
}

pub type Result<T = ()> = std::result::Result<T, ValidationError>;

pub const MAX_URL_LEN: usize = 2048;
pub const MAX_EVENT_TYPE_LEN: usize = 256;
pub const MAX_NAME_LEN: usize = 256;
pub const MAX_DESCRIPTION_LEN: usize = 4096;
pub const MAX_FILTERS: usize = 100;
pub const MAX_CHANNELS: usize = 10;
pub const MAX_CHANNEL_LEN: usize = 128;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 64;
pub const MAX_METADATA_VALUE_LEN: usize = 512;
pub const MAX_HEADERS: usize = 32;
pub const MAX_HEADER_VALUE_LEN: usize = 4096;

/// A subscription URL: absolute http(s), a host, no credentials, at most 2,048 characters.
pub fn subscription_url(field: &str, value: &str) -> Result<url::Url> {
    if value.is_empty() {
        return Err(ValidationError::new(
            field,
            "is required: an http:// or https:// URL",
        ));
    }
    if value.len() > MAX_URL_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} characters long; the limit is {MAX_URL_LEN}",
                value.len()
            ),
        ));
    }
    let url = url::Url::parse(value)
        .map_err(|e| ValidationError::new(field, format!("is not a valid URL ({e})")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ValidationError::new(
            field,
            format!(
                "has scheme {:?}; only http and https are allowed",
                url.scheme()
            ),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ValidationError::new(
            field,
            "must not contain credentials (user:password@); send them in `headers` instead",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ValidationError::new(field, "must name a host"));
    }
    Ok(url)
}

fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

const EVENT_TYPE_RULE: &str =
    "dot-separated segments of letters, digits, `_` and `-`, like `invoice.paid`";

/// An event type: `invoice.paid`.
pub fn event_type(field: &str, value: &str) -> Result {
    if value.is_empty() {
        return Err(ValidationError::new(
            field,
            format!("is empty; expected {EVENT_TYPE_RULE}"),
        ));
    }
    if value.len() > MAX_EVENT_TYPE_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} characters long; the limit is {MAX_EVENT_TYPE_LEN}",
                value.len()
            ),
        ));
    }
    if value
        .split('.')
        .any(|seg| seg.is_empty() || !seg.chars().all(is_segment_char))
    {
        return Err(ValidationError::new(
            field,
            format!("{value:?} is not a valid event type; expected {EVENT_TYPE_RULE}"),
        ));
    }
    Ok(())
}

/// An event-type filter: an event type, `prefix.*`, or `*`.
pub fn event_type_filter(field: &str, value: &str) -> Result {
    if value == "*" {
        return Ok(());
    }
    let rule = || {
        ValidationError::new(
            field,
            format!(
                "{value:?} is not a valid filter; expected an event type (`invoice.paid`), \
                 a prefix wildcard (`invoice.*`) or `*`"
            ),
        )
    };
    if value.is_empty() {
        return Err(ValidationError::new(
            field,
            "is empty; expected an event type (`invoice.paid`), a prefix wildcard (`invoice.*`) or `*`",
        ));
    }
    let name = value.strip_suffix(".*").unwrap_or(value);
    event_type(field, name).map_err(|_| rule())
}

pub fn event_type_filters(field: &str, values: &[String]) -> Result {
    if values.len() > MAX_FILTERS {
        return Err(ValidationError::new(
            field,
            format!("has {} filters; the limit is {MAX_FILTERS}", values.len()),
        ));
    }
    for (i, v) in values.iter().enumerate() {
        event_type_filter(&format!("{field}[{i}]"), v)?;
    }
    Ok(())
}

/// Channels: at most 10, each 1–128 characters of letters, digits, `_ - . :`.
pub fn channels(field: &str, values: &[String]) -> Result {
    if values.len() > MAX_CHANNELS {
        return Err(ValidationError::new(
            field,
            format!("has {} channels; the limit is {MAX_CHANNELS}", values.len()),
        ));
    }
    for (i, v) in values.iter().enumerate() {
        let ok = !v.is_empty()
            && v.len() <= MAX_CHANNEL_LEN
            && v.chars()
                .all(|c| is_segment_char(c) || c == '.' || c == ':');
        if !ok {
            return Err(ValidationError::new(
                format!("{field}[{i}]"),
                format!(
                    "{v:?} is not a valid channel; expected 1 to {MAX_CHANNEL_LEN} letters, digits, `_`, `-`, `.` or `:`"
                ),
            ));
        }
    }
    Ok(())
}

/// A name for people: 1–256 characters, no control characters.
pub fn name(field: &str, value: &str) -> Result {
    if value.trim().is_empty() {
        return Err(ValidationError::new(
            field,
            "is required (1 to 256 characters)",
        ));
    }
    if value.chars().count() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub fn description(field: &str, value: &str) -> Result {
    if value.len() > MAX_DESCRIPTION_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} bytes long; the limit is {MAX_DESCRIPTION_LEN}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// An idempotency key: 1–256 printable ASCII characters.
pub fn idempotency_key(field: &str, value: &str) -> Result {
    if value.len() > MAX_IDEMPOTENCY_KEY_LEN || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ValidationError::new(
            field,
            format!(
                "must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces"
            ),
        ));
    }
    Ok(())
}

pub fn metadata(field: &str, value: &BTreeMap<String, String>) -> Result {
    if value.len() > MAX_METADATA_ENTRIES {
        return Err(ValidationError::new(
            field,
            format!(
                "has {} entries; the limit is {MAX_METADATA_ENTRIES}",
                value.len()
            ),
        ));
    }
    for (k, v) in value {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(ValidationError::new(
                field,
                format!("key {k:?} must be 1 to {MAX_METADATA_KEY_LEN} bytes"),
            ));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(ValidationError::new(
                format!("{field}[{k}]"),
                format!(
                    "is {} bytes long; the limit is {MAX_METADATA_VALUE_LEN}",
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Headers Hookline sets itself, which a subscription may not override.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "connection",
    "transfer-encoding",
    "user-agent",
    "te",
    "upgrade",
];

/// Extra headers: valid HTTP names and values, none of `webhook-*` or those Hookline sets.
pub fn headers(field: &str, value: &BTreeMap<String, String>) -> Result {
    if value.len() > MAX_HEADERS {
        return Err(ValidationError::new(
            field,
            format!("has {} headers; the limit is {MAX_HEADERS}", value.len()),
        ));
    }
    for (k, v) in value {
        let lower = k.to_ascii_lowercase();
        let token = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(ValidationError::new(
                field,
                format!("{k:?} is not a valid HTTP header name"),
            ));
        }
        if lower.starts_with("webhook-") || RESERVED_HEADERS.contains(&lower.as_str()) {
            return Err(ValidationError::new(
                field,
                format!("{k:?} is set by Hookline and cannot be overridden"),
            ));
        }
        if v.len() > MAX_HEADER_VALUE_LEN || v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
        {
            return Err(ValidationError::new(
                format!("{field}[{k}]"),
                format!("must be at most {MAX_HEADER_VALUE_LEN} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

/// A retry schedule: at most 50 delays, each at most 7 days.
pub fn retry_schedule(field: &str, value: &[Duration]) -> Result {
    if value.len() > MAX_SCHEDULE_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "has {} delays; the limit is {MAX_SCHEDULE_LEN}",
                value.len()
            ),
        ));
    }
    if let Some((i, _)) = value
        .iter()
        .enumerate()
        .find(|(_, d)| **d > MAX_SCHEDULE_DELAY)
    {
        return Err(ValidationError::new(
            format!("{field}[{i}]"),
            "is longer than 7 days, the longest delay allowed",
        ));
    }
    Ok(())
}

/// A JSON payload: well-formed JSON of at most `limit` bytes.
pub fn json_payload(field: &str, value: &[u8], limit: usize) -> Result {
    if value.len() > limit {
        return Err(ValidationError::new(
            field,
            format!(
                "is {}; the limit is {}",
                human_bytes(value.len()),
                human_bytes(limit)
            ),
        ));
    }
    if value.is_empty() {
        return Err(ValidationError::new(
            field,
            "is empty; expected a JSON document (an object is the documented form)",
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(value)
        .map_err(|e| ValidationError::new(field, format!("is not valid JSON: {e}")))?;
    Ok(())
}

/// `1.3 MiB`, `512 KiB`, `17 bytes`.
pub fn human_bytes(n: usize) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if f >= KIB * KIB {
        format!("{} MiB", trim_float(f / (KIB * KIB)))
    } else if f >= KIB {
        format!("{} KiB", trim_float(f / KIB))
    } else {
        format!("{n} bytes")
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(subscription_url("url", "https://example.com/hook").is_ok());
        assert!(subscription_url("url", "http://127.0.0.1:8080/x?y=1").is_ok());
        let e = subscription_url("url", "ftp://example.com").unwrap_err();
        assert!(e.to_string().contains("only http and https"), "{e}");
        let e = subscription_url("url", "https://u:p@example.com").unwrap_err();
        assert!(e.to_string().contains("credentials"), "{e}");
        let long = format!("https://example.com/{}", "a".repeat(2100));
        let e = subscription_url("url", &long).unwrap_err();
        assert!(e.to_string().contains("2048"), "{e}");
        assert!(subscription_url("url", "not a url").is_err());
        assert!(subscription_url("url", "").is_err());
    }

    #[test]
    fn event_types_and_filters() {
        assert!(event_type("t", "invoice.paid").is_ok());
        assert!(event_type("t", "a-b_c.D1").is_ok());
        assert!(event_type("t", "invoice..paid").is_err());
        assert!(event_type("t", "invoice.*").is_err());
        assert!(event_type("t", "").is_err());
        assert!(event_type("t", "has space").is_err());
        assert!(event_type_filter("f", "*").is_ok());
        assert!(event_type_filter("f", "invoice.*").is_ok());
        assert!(event_type_filter("f", "invoice.paid").is_ok());
        assert!(event_type_filter("f", "invoice*").is_err());
        assert!(event_type_filter("f", "*.paid").is_err());
        let e = event_type_filter("event_types[0]", "").unwrap_err();
        assert!(e.to_string().starts_with("event_types[0]: is empty"), "{e}");
    }

    #[test]
    fn payloads() {
        assert!(json_payload("payload", br#"{"a":1}"#, 1024).is_ok());
        assert!(json_payload("payload", b"[1,2]", 1024).is_ok());
        let e = json_payload("payload", b"{nope", 1024).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let big = vec![b' '; 1363149];
        let e = json_payload("payload", &big, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "payload: is 1.3 MiB; the limit is 1 MiB");
    }

    #[test]
    fn headers_cannot_override_ours() {
        let mut h = BTreeMap::new();
        h.insert("X-Api-Key".to_string(), "v".to_string());
        assert!(headers("headers", &h).is_ok());
        h.insert("Webhook-Signature".to_string(), "v".to_string());
        assert!(headers("headers", &h).is_err());
    }
}
