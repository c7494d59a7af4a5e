//! The RabbitMQ objects Hookline uses, named from one prefix, and how they are
//! declared (idempotently, on every connection) and deleted (by tests).
//!
//! For a prefix `P`:
//!
//! | object | kind | purpose |
//! |---|---|---|
//! | `P.work` | direct exchange, durable | routes `deliveries`, `retries`, `deliveries.<i>`, `retries.<i>` to the work queues |
//! | `P.deliveries`, `P.retries` | quorum queues | the unsharded work queues (older versions published there; still consumed); dead-letter to `P.dlx` |
//! | `P.deliveries.<i>`, `P.retries.<i>` | quorum queues | the shard queues, `i` in `0..delivery_shards`; same arguments |
//! | `P.dlx` | fanout exchange, durable | receives rejected and over-delivered messages |
//! | `P.dead-letter` | quorum queue | keeps them for inspection |
//! | `P.changes` | fanout exchange, durable | registry change announcements |
//!
//! Changing an argument of an existing queue (the delivery limit, say) makes
//! the declaration fail with PRECONDITION_FAILED: RabbitMQ does not alter
//! queues in place. Tune existing queues with policies instead.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::{BrokerError, MAX_SHARDS, QueueName};

/// Longest prefix accepted: the longest name derived from it must stay well
/// under AMQP's 255-byte limit for names.
const MAX_PREFIX_LEN: usize = 200;

/// The names of every object of one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) work_exchange: String,
    pub(crate) dead_letter_exchange: String,
    pub(crate) changes_exchange: String,
    pub(crate) dead_letter_queue: String,
    prefix: String,
    delivery_limit: u32,
    /// Shard queues per kind declared at every connection.
    pub(crate) shards: u16,
}

impl Topology {
    /// Names for `prefix`, which must be 1 to 200 characters of ASCII letters,
    /// digits, `-`, `_`, `.` or `:`.
    pub(crate) fn new(prefix: &str, delivery_limit: u32, shards: u16) -> Result<Self, BrokerError> {
        if shards == 0 || shards > MAX_SHARDS {
            return Err(BrokerError::InvalidConfig(format!(
                "delivery_shards must be between 1 and {MAX_SHARDS}, got {shards}"
            )));
        }
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
            return Err(BrokerError::InvalidConfig(format!(
                "the queue name prefix must be 1 to {MAX_PREFIX_LEN} characters long, got {}",
                prefix.len()
            )));
        }
        if let Some(bad) = prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(BrokerError::InvalidConfig(format!(
                "the queue name prefix {prefix:?} contains {bad:?}; use ASCII letters, digits, '-', '_', '.' or ':'"
            )));
        }
        if delivery_limit == 0 || delivery_limit > i32::MAX as u32 {
            return Err(BrokerError::InvalidConfig(format!(
                "the delivery limit must be between 1 and {}, got {delivery_limit}",
                i32::MAX
            )));
        }
        Ok(Self {
            work_exchange: format!("{prefix}.work"),
            dead_letter_exchange: format!("{prefix}.dlx"),
            changes_exchange: format!("{prefix}.changes"),
            dead_letter_queue: format!("{prefix}.dead-letter"),
            prefix: prefix.to_owned(),
            delivery_limit,
            shards,
        })
    }

    /// The full name of a work queue (`P.deliveries`, `P.retries.3`).
    pub(crate) fn queue(&self, queue: QueueName) -> String {
        format!("{}.{}", self.prefix, queue.name())
    }

    /// Declares every object. Declaring what already exists with the same
    /// arguments succeeds, so this runs on every (re)connection.
    pub(crate) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (&self.work_exchange, ExchangeKind::Direct),
            (&self.dead_letter_exchange, ExchangeKind::Fanout),
            (&self.changes_exchange, ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(short(name), kind, durable, FieldTable::default())
                .await?;
        }

        let mut dead_letter_args = FieldTable::default();
        dead_letter_args.insert("x-queue-type".into(), long("quorum"));
        channel
            .queue_declare(
                short(&self.dead_letter_queue),
                QueueDeclareOptions::durable(),
                dead_letter_args,
            )
            .await?;
        channel
            .queue_bind(
                short(&self.dead_letter_queue),
                short(&self.dead_letter_exchange),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for queue in QueueName::consumed(self.shards) {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long("quorum"));
            args.insert(
                "x-dead-letter-exchange".into(),
                long(&self.dead_letter_exchange),
            );
            // Checked in `new` to fit in an i32.
            let limit = i32::try_from(self.delivery_limit).unwrap_or(i32::MAX);
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
            let name = self.queue(queue);
            channel
                .queue_declare(short(&name), QueueDeclareOptions::durable(), args)
                .await?;
            channel
                .queue_bind(
                    short(&name),
                    short(&self.work_exchange),
                    short(&queue.name()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange of the prefix, with their messages.
    pub(crate) async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        let mut queues: Vec<String> = QueueName::consumed(self.shards)
            .into_iter()
            .map(|queue| self.queue(queue))
            .collect();
        queues.push(self.dead_letter_queue.clone());
        for queue in queues {
            channel
                .queue_delete(short(&queue), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [
            &self.work_exchange,
            &self.dead_letter_exchange,
            &self.changes_exchange,
        ] {
            channel
                .exchange_delete(short(exchange), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// A name known to fit (checked by [`Topology::new`]).
pub(crate) fn short(name: &str) -> ShortString {
    ShortString::from(name)
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::new("t1", 20, 4).unwrap();
        assert_eq!(t.queue(QueueName::Deliveries), "t1.deliveries");
        assert_eq!(t.queue(QueueName::Retries), "t1.retries");
        assert_eq!(
            t.queue(QueueName::Shard(crate::QueueKind::Deliveries, 3)),
            "t1.deliveries.3"
        );
        assert_eq!(t.dead_letter_queue, "t1.dead-letter");
        assert_eq!(t.work_exchange, "t1.work");
        assert_eq!(t.dead_letter_exchange, "t1.dlx");
        assert_eq!(t.changes_exchange, "t1.changes");
    }

    #[test]
    fn bad_prefixes_are_refused() {
        assert!(Topology::new("", 20, 1).is_err());
        assert!(Topology::new("a b", 20, 1).is_err());
        assert!(Topology::new(&"x".repeat(201), 20, 1).is_err());
        assert!(Topology::new("ok", 0, 1).is_err());
        assert!(Topology::new("ok", 20, 0).is_err());
        assert!(Topology::new("ok", 20, 257).is_err());
        assert!(Topology::new("tenant-1_test:a.b", 20, 256).is_ok());
    }
}
