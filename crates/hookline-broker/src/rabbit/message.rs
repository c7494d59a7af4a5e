//! Conversions between port messages and AMQP ones: outgoing properties, incoming
//! deliveries with their headers, and the acker that settles a delivery.

use std::collections::BTreeMap;

use async_trait::async_trait;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::{Acker, BrokerError, ReceivedMessage, Settlement};

/// AMQP properties of an outgoing message.
pub(super) fn properties(
    headers: &BTreeMap<String, String>,
    persistent: bool,
) -> Result<BasicProperties, String> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        let key = ShortString::try_new(name.as_str()).map_err(|_| {
            format!(
                "header name {:?}... is {} bytes long; AMQP allows 255",
                name.chars().take(32).collect::<String>(),
                name.len()
            )
        })?;
        table.insert(key, AMQPValue::LongString(LongString::from(value.as_str())));
    }
    Ok(BasicProperties::default()
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_headers(table))
}

/// Turns a lapin delivery into a port message.
pub(super) fn received(delivery: Delivery) -> ReceivedMessage {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(name, value)| header_string(value).map(|v| (name.to_string(), v)))
                .collect()
        })
        .unwrap_or_default();
    ReceivedMessage::new(
        delivery.data,
        headers,
        delivery.redelivered,
        Box::new(RabbitAcker(delivery.acker)),
    )
}

/// The string form of a header value; `None` for tables, arrays and the like.
pub(super) fn header_string(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        _ => return None,
    })
}

/// Settles a message on the channel it came from.
pub(super) struct RabbitAcker(lapin::Acker);

#[async_trait]
impl Acker for RabbitAcker {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BrokerError> {
        let result = match settlement {
            Settlement::Ack => self.0.ack(BasicAckOptions::default()).await,
            Settlement::Requeue => {
                self.0
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
            }
            Settlement::DeadLetter => {
                self.0
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: false,
                    })
                    .await
            }
        };
        match result {
            Ok(true) => Ok(()),
            // lapin refuses to settle on a closed channel: the broker has
            // already put the message back.
            Ok(false) => Err(BrokerError::StaleDelivery),
            Err(_) if self.0.poisoned() => Err(BrokerError::StaleDelivery),
            Err(e) => Err(BrokerError::backend("settle a message", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let mut headers = BTreeMap::new();
        headers.insert("traceparent".to_owned(), "00-abc-def-01".to_owned());
        let props = properties(&headers, true).unwrap();
        assert_eq!(*props.delivery_mode(), Some(2));
        let table = props.headers().as_ref().unwrap();
        let value = table.inner().get("traceparent").unwrap();
        assert_eq!(header_string(value).as_deref(), Some("00-abc-def-01"));
        assert_eq!(
            header_string(&AMQPValue::LongLongInt(3)).as_deref(),
            Some("3")
        );
    }

    #[test]
    fn overlong_header_names_are_refused() {
        let mut headers = BTreeMap::new();
        headers.insert("x".repeat(300), "v".to_owned());
        let error = properties(&headers, true).unwrap_err();
        assert!(error.contains("300 bytes"), "{error}");
    }
}
