//! An event to publish, and the idempotency key every event carries.

use crate::pb;

/// One event for [`Client::publish`](crate::Client::publish).
#[derive(Debug, Clone)]
pub struct Event {
    tenant_id: String,
    event_type: String,
    payload: Vec<u8>,
    idempotency_key: Option<String>,
    channels: Vec<String>,
}

impl Event {
    /// An event of `event_type` (`invoice.paid`) for the tenant, with its JSON payload
    /// exactly as receivers should get it.
    pub fn new(
        tenant_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            idempotency_key: None,
            channels: Vec::new(),
        }
    }

    /// Your own idempotency key (at most 256 printable ASCII characters): a second
    /// publish with the same key for the same tenant stores nothing new. Without one the
    /// client generates a key per event.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Adds a channel; only subscriptions on one of the event's channels, or on none,
    /// receive it.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channels.push(channel.into());
        self
    }

    /// The request, with a generated idempotency key (`hlc_` + a ULID) if none was set.
    pub(crate) fn into_request(self) -> pb::PublishRequest {
        pb::PublishRequest {
            tenant_id: self.tenant_id,
            event_type: self.event_type,
            payload: self.payload,
            idempotency_key: self
                .idempotency_key
                .unwrap_or_else(|| format!("hlc_{}", ulid::Ulid::new())),
            channels: self.channels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_gets_its_own_key_unless_given_one() {
        let a = Event::new("t", "x.y", "{}").into_request();
        let b = Event::new("t", "x.y", "{}").into_request();
        assert!(a.idempotency_key.starts_with("hlc_"));
        assert_ne!(a.idempotency_key, b.idempotency_key);
        let c = Event::new("t", "x.y", "{}")
            .idempotency_key("mine")
            .into_request();
        assert_eq!(c.idempotency_key, "mine");
    }
}
