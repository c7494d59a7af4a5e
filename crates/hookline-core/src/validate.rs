//! Input rules, checked before anything is stored.
//!
//! Each check returns a [`ValidationError`] naming the field, what was wrong and what is
//! allowed, so that the gRPC layer can answer `INVALID_ARGUMENT` with a message a person
//! can act on.

pub use crate::fmt::thousands;
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
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Deepest nesting of arrays and objects a payload may have.
pub const MAX_JSON_DEPTH: usize = 128;
/// The largest value an `integer` column holds, for numeric fields that are stored.
pub const MAX_STORED_U32: u32 = i32::MAX as u32;
/// Characters of a refused input repeated in an error or a log line.
const EXCERPT_CHARS: usize = 64;

/// At most 64 characters of `value`, quoted, with the full length if it was cut: what an
/// error message or a log line may repeat of an input of any size.
pub fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!(
            "{:?}… ({} characters)",
            &value[..cut],
            thousands(value.chars().count() as u64)
        ),
    }
}

/// A number that is stored: within `min..=max` (at most what an `integer` column holds),
/// so that a value out of range is the caller's error, never the database's.
pub fn stored_u32(field: &str, value: u32, min: u32, max: u32) -> Result {
    if value < min || value > max {
        return Err(ValidationError::new(
            field,
            format!(
                "is {}; allowed: {} to {}",
                thousands(u64::from(value)),
                thousands(u64::from(min)),
                thousands(u64::from(max))
            ),
        ));
    }
    Ok(())
}

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

/// Headers Hookline sets itself, which a subscription may not override, and headers that
/// would let a tenant speak for the platform to cloud metadata services or proxies.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "connection",
    "transfer-encoding",
    "user-agent",
    "te",
    "upgrade",
    "metadata-flavor",
    "forwarded",
    "proxy-authorization",
];

/// Prefixes of names refused for the same reasons.
const RESERVED_HEADER_PREFIXES: &[&str] = &["webhook-", "x-forwarded-"];

/// One extra header name: an HTTP token of 1 to 256 characters that Hookline allows a
/// tenant to send. The dispatcher applies it too, to headers stored before a rule existed.
pub fn header_name(field: &str, name: &str) -> Result {
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "has a header name of {} characters ({}); the limit is {MAX_HEADER_NAME_LEN}",
                thousands(name.len() as u64),
                excerpt(name)
            ),
        ));
    }
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(ValidationError::new(
            field,
            format!(
                "{} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
                excerpt(name)
            ),
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str())
        || RESERVED_HEADER_PREFIXES
            .iter()
            .any(|p| lower.starts_with(p))
    {
        return Err(ValidationError::new(
            field,
            format!(
                "{name:?} cannot be set: Hookline sets it itself, or it would speak for Hookline \
                 to a proxy or a metadata service (refused: webhook-*, x-forwarded-*, {})",
                RESERVED_HEADERS.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Extra headers: at most 32, each with a valid and allowed name ([`header_name`]) and a
/// value of at most 4,096 bytes without control characters.
pub fn headers(field: &str, value: &BTreeMap<String, String>) -> Result {
    if value.len() > MAX_HEADERS {
        return Err(ValidationError::new(
            field,
            format!("has {} headers; the limit is {MAX_HEADERS}", value.len()),
        ));
    }
    for (k, v) in value {
        header_name(field, k)?;
        if v.len() > MAX_HEADER_VALUE_LEN || v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
        {
            return Err(ValidationError::new(
                format!("{field}[{k}]"),
                format!(
                    "is {} bytes; it must be at most {} bytes without control characters",
                    thousands(v.len() as u64),
                    thousands(MAX_HEADER_VALUE_LEN as u64)
                ),
            ));
        }
    }
    Ok(())
}

/// A signing secret given by a caller for a subscription signing with `scheme`: `whsec_` +
/// base64 of 24 to 64 bytes (HMAC), or `whsk_` + base64 of a 32-byte ed25519 seed; either
/// way not all the same byte.
pub fn given_secret(field: &str, secret: &str, scheme: crate::signing::SignatureScheme) -> Result {
    use crate::signing::SignatureScheme;
    let key = crate::signing::SigningKey::from_secret(secret)
        .map_err(|e| ValidationError::new(field, e.to_string()))?;
    match scheme {
        SignatureScheme::HmacSha256 if !secret.starts_with("whsec_") => {
            return Err(ValidationError::new(
                field,
                "must start with `whsec_` (the subscription signs with HMAC, `v1`)",
            ));
        }
        SignatureScheme::Ed25519 if key.scheme() != SignatureScheme::Ed25519 => {
            return Err(ValidationError::new(
                field,
                "must be an ed25519 secret key, `whsk_` (the subscription signs with `v1a`)",
            ));
        }
        _ => {}
    }
    if key.is_uniform() {
        return Err(ValidationError::new(
            field,
            "decodes to bytes that are all the same, which is no secret; give random bytes \
             (or leave it empty and Hookline generates one)",
        ));
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

/// A JSON payload: well-formed JSON of at most `limit` bytes, UTF-8 throughout, nested at
/// most [`MAX_JSON_DEPTH`] levels.
pub fn json_payload(field: &str, value: &[u8], limit: usize) -> Result {
    if value.len() > limit {
        return Err(ValidationError::new(
            field,
            format!(
                "is {} bytes; the limit is {}",
                thousands(value.len() as u64),
                thousands(limit as u64)
            ),
        ));
    }
    if value.is_empty() {
        return Err(ValidationError::new(
            field,
            "is empty; expected a JSON document (an object is the documented form)",
        ));
    }
    // Skipping a value (`IgnoredAny`) neither checks the UTF-8 of strings nor limits
    // nesting, so both are checked here first.
    if let Err(e) = std::str::from_utf8(value) {
        return Err(ValidationError::new(
            field,
            format!(
                "is not valid UTF-8 at byte {}; JSON text must be UTF-8",
                thousands(e.valid_up_to() as u64)
            ),
        ));
    }
    json_depth(field, value)?;
    serde_json::from_slice::<serde::de::IgnoredAny>(value)
        .map_err(|e| ValidationError::new(field, format!("is not valid JSON: {e}")))?;
    Ok(())
}

/// Refuses arrays and objects nested deeper than [`MAX_JSON_DEPTH`] (strings skipped).
fn json_depth(field: &str, value: &[u8]) -> Result {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in value.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "nests arrays and objects more than {MAX_JSON_DEPTH} levels deep \
                             (at byte {}); the limit is {MAX_JSON_DEPTH}",
                            thousands(i as u64)
                        ),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
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
        let big = vec![b' '; 1_048_577];
        let e = json_payload("payload", &big, 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "payload: is 1,048,577 bytes; the limit is 1,048,576"
        );
    }

    #[test]
    fn payload_depth_is_bounded() {
        let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(json_payload("payload", ok.as_bytes(), 1 << 20).is_ok());
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        let e = json_payload("payload", deep.as_bytes(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("more than 128 levels"), "{e}");
        let very = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(json_payload("payload", very.as_bytes(), 1 << 20).is_err());
        // Brackets inside strings do not count.
        let s = format!("{{\"a\":\"{}\\\"\"}}", "[".repeat(500));
        assert!(
            json_payload("payload", s.as_bytes(), 1 << 20).is_ok(),
            "{s}"
        );
    }

    #[test]
    fn payload_strings_must_be_utf8() {
        let e = json_payload("payload", b"{\"a\":\"\xff\xfe\"}", 1024).unwrap_err();
        assert!(e.to_string().contains("not valid UTF-8 at byte 6"), "{e}");
    }

    #[test]
    fn given_secrets_must_be_random_looking() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        use crate::signing::{SignatureScheme, generate_secret, generate_secret_key};
        assert!(given_secret("secret", &generate_secret(), Default::default()).is_ok());
        let whsk = generate_secret_key();
        assert!(given_secret("secret", &whsk, SignatureScheme::Ed25519).is_ok());
        let e = given_secret("secret", &whsk, SignatureScheme::HmacSha256).unwrap_err();
        assert!(e.to_string().contains("`whsec_`"), "{e}");
        let e = given_secret("secret", &generate_secret(), SignatureScheme::Ed25519).unwrap_err();
        assert!(e.to_string().contains("`whsk_`"), "{e}");
        let zero_seed = format!("whsk_{}", b64(&[0u8; 32]));
        assert!(given_secret("secret", &zero_seed, SignatureScheme::Ed25519).is_err());
        let zeros = format!("whsec_{}", b64(&[0u8; 24]));
        let e = given_secret("secret", &zeros, Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("all the same"), "{e}");
        let short = format!("whsec_{}", b64(&[1, 2, 3]));
        assert!(given_secret("secret", &short, Default::default()).is_err());
        let long = format!("whsec_{}", b64(&[7u8; 65]));
        assert!(given_secret("secret", &long, Default::default()).is_err());
        let no_prefix = b64(&(0u8..32).collect::<Vec<_>>());
        assert!(given_secret("secret", &no_prefix, Default::default()).is_err());
    }

    #[test]
    fn stored_numbers_are_in_range() {
        assert!(stored_u32("n", 5, 0, MAX_STORED_U32).is_ok());
        let e = stored_u32("rate_limit_per_second", u32::MAX, 0, MAX_STORED_U32).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rate_limit_per_second: is 4,294,967,295; allowed: 0 to 2,147,483,647"
        );
    }

    #[test]
    fn header_names_are_bounded_and_not_platform_ones() {
        let long = "a".repeat(100_000);
        let e = header_name("headers", &long).unwrap_err().to_string();
        assert!(e.contains("100,000 characters"), "{e}");
        assert!(
            e.len() < 300,
            "the error repeats the whole name: {} bytes",
            e.len()
        );
        assert!(header_name("headers", &"a".repeat(256)).is_ok());
        for refused in [
            "Metadata-Flavor",
            "X-Forwarded-For",
            "x-forwarded-host",
            "Forwarded",
            "Proxy-Authorization",
            "Host",
            "Webhook-Id",
        ] {
            assert!(header_name("headers", refused).is_err(), "{refused}");
        }
        let bad = format!("{} x", "b".repeat(1000));
        let e = header_name("headers", &bad).unwrap_err().to_string();
        assert!(e.len() < 300, "{e}");
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
