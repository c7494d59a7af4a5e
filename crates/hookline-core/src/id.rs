//! Prefixed, time-sortable identifiers (`evt_01JD…`).
//!
//! An id is a type prefix, an underscore and a ULID: 48 bits of milliseconds then 80 random
//! bits, in Crockford base32. Ids of one kind sort by creation time, so they double as
//! pagination cursors and keep B-tree inserts at the right edge of the index.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use ulid::Ulid;

/// The kinds of object that carry an id, each with its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    Tenant,
    Subscription,
    Event,
    Delivery,
    Attempt,
    ApiKey,
    Secret,
}

impl IdKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            IdKind::Tenant => "ten",
            IdKind::Subscription => "sub",
            IdKind::Event => "evt",
            IdKind::Delivery => "dlv",
            IdKind::Attempt => "att",
            IdKind::ApiKey => "key",
            IdKind::Secret => "sec",
        }
    }

    /// A human name for error messages ("tenant id").
    pub const fn noun(self) -> &'static str {
        match self {
            IdKind::Tenant => "tenant",
            IdKind::Subscription => "subscription",
            IdKind::Event => "event",
            IdKind::Delivery => "delivery",
            IdKind::Attempt => "attempt",
            IdKind::ApiKey => "API key",
            IdKind::Secret => "secret",
        }
    }
}

/// Why a string is not an id of the expected kind.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "{field} {value:?} is not a {noun} id: expected `{prefix}_` followed by 26 base32 characters"
)]
pub struct IdError {
    pub field: String,
    pub value: String,
    pub noun: &'static str,
    pub prefix: &'static str,
}

/// A prefixed identifier. Stored and transported as its string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Id(String);

impl Id {
    /// A fresh id of `kind`, stamped with the current time.
    pub fn new(kind: IdKind) -> Self {
        Self::from_ulid(kind, Ulid::new())
    }

    pub fn from_ulid(kind: IdKind, ulid: Ulid) -> Self {
        Id(format!("{}_{}", kind.prefix(), ulid))
    }

    /// Parses `value` as an id of `kind`; `field` names the input in the error.
    pub fn parse(kind: IdKind, field: &str, value: &str) -> Result<Self, IdError> {
        let err = || IdError {
            field: field.to_string(),
            value: truncate(value, 64),
            noun: kind.noun(),
            prefix: kind.prefix(),
        };
        let rest = value
            .strip_prefix(kind.prefix())
            .and_then(|r| r.strip_prefix('_'))
            .ok_or_else(err)?;
        let ulid = Ulid::from_string(rest).map_err(|_| err())?;
        Ok(Self::from_ulid(kind, ulid))
    }

    /// When the id was made: the time part of its ULID (millisecond precision). `None` for
    /// a string that is not a prefixed ULID.
    pub fn created_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let (_, rest) = self.0.split_once('_')?;
        let ms = Ulid::from_string(rest).ok()?.timestamp_ms();
        chrono::DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
    }

    /// Wraps a string read back from storage, where it was written as a valid id.
    pub fn from_trusted(value: String) -> Self {
        Id(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_string()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_prefix_and_round_trip() {
        let id = Id::new(IdKind::Event);
        assert!(id.as_str().starts_with("evt_"));
        assert_eq!(id.as_str().len(), 4 + 26);
        assert_eq!(
            Id::parse(IdKind::Event, "event_id", id.as_str()).unwrap(),
            id
        );
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = Id::from_ulid(IdKind::Delivery, Ulid::from_parts(1_000, 5));
        let b = Id::from_ulid(IdKind::Delivery, Ulid::from_parts(2_000, 1));
        assert!(a < b);
    }

    #[test]
    fn wrong_prefix_or_garbage_is_rejected_with_the_field_named() {
        let sub = Id::new(IdKind::Subscription);
        let err = Id::parse(IdKind::Tenant, "tenant_id", sub.as_str()).unwrap_err();
        assert!(err.to_string().contains("tenant_id"));
        assert!(err.to_string().contains("ten_"));
        assert!(Id::parse(IdKind::Tenant, "tenant_id", "ten_not-a-ulid").is_err());
        let stamped = Id::from_ulid(IdKind::Event, Ulid::from_parts(1_700_000_000_123, 7));
        assert_eq!(
            stamped.created_at().map(|t| t.timestamp_millis()),
            Some(1_700_000_000_123)
        );
        assert_eq!(Id::from_trusted("evt_nope".into()).created_at(), None);
        assert!(Id::parse(IdKind::Tenant, "tenant_id", "").is_err());
    }
}
