//! The queue port of Hookline: how the services hand work to each other.
//!
//! Ingest publishes delivery messages, dispatchers consume them, the retry
//! service consumes failed attempts and re-publishes deliveries when they are
//! due, and the registry announces changes so that caches drop stale entries.
//! All of that goes through the [`Broker`] trait defined here, which knows
//! nothing of AMQP: the cluster adapter ([`RabbitBroker`], RabbitMQ through
//! lapin) and the embedded adapter ([`EmbeddedBroker`], a durable queue kept
//! in the SQLite database of the one-process mode) both implement it, and the
//! services never see which one they talk to.
//!
//! Delivery is at-least-once. A consumer settles every [`ReceivedMessage`]
//! exactly once: [`ack`](ReceivedMessage::ack) when its outcome is durable,
//! [`retry_later`](ReceivedMessage::retry_later) to put it back on the queue,
//! or [`dead_letter`](ReceivedMessage::dead_letter) to park it in the
//! dead-letter queue. A message that is never settled (the process died, the
//! connection dropped) is delivered again, with `redelivered == true`.
//!
//! ```no_run
//! # async fn example() -> Result<(), hookline_broker::BrokerError> {
//! use futures::StreamExt;
//! use hookline_broker::{Broker, OutgoingMessage, QueueName, RabbitBroker, RabbitConfig};
//!
//! let broker = RabbitBroker::connect(RabbitConfig::default()).await?;
//! broker
//!     .publish(QueueName::Deliveries, vec![OutgoingMessage::new(b"{}".to_vec())])
//!     .await?;
//! let mut deliveries = broker.consume(QueueName::Deliveries, 64).await?;
//! while let Some(message) = deliveries.next().await {
//!     // ... do the work, make its outcome durable, then:
//!     message.ack().await.ok(); // an error means "will be redelivered": ignorable
//! }
//! broker.close().await;
//! # Ok(())
//! # }
//! ```

pub mod amqp_tls;
mod embedded;
mod rabbit;
pub mod shards;

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

pub use amqp_tls::AmqpTlsFiles;
pub use embedded::{EmbeddedBroker, EmbeddedConfig};
pub use rabbit::{RabbitBroker, RabbitConfig};

/// What a work queue holds: first attempts or later ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKind {
    /// First attempts of new deliveries.
    Deliveries,
    /// Later attempts (due retries, manual retries and replays).
    Retries,
}

impl QueueKind {
    /// Both kinds, in a stable order.
    pub const ALL: [QueueKind; 2] = [QueueKind::Deliveries, QueueKind::Retries];

    /// The short name of the kind (`"deliveries"`), which is also the name of its
    /// unsharded queue.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Deliveries => "deliveries",
            QueueKind::Retries => "retries",
        }
    }
}

/// Most shard queues of one kind (`delivery_shards` is 1 to this).
pub const MAX_SHARDS: u16 = 256;

/// The work queues of the pipeline: per kind, the unsharded queue (what versions
/// before fair delivery used, still consumed so nothing queued by them is stranded)
/// and the shard queues `deliveries.<i>` / `retries.<i>` (see [`shards`]).
///
/// The one naming rule of the work queues is [`QueueName::name`]; adapters prefix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueName {
    /// First attempts of new deliveries. Published through the [`shards::ShardRouter`]
    /// it means "the shard of this delivery's tenant"; to an adapter it is the
    /// unsharded queue `deliveries`.
    Deliveries,
    /// Later attempts: deliveries due again, queued by the retry scheduler and by a
    /// manual retry or replay (DeliveryService). Routed like [`QueueName::Deliveries`];
    /// to an adapter it is the unsharded queue `retries`.
    Retries,
    /// Shard `i` (below [`MAX_SHARDS`]) of a kind: `deliveries.<i>` or `retries.<i>`.
    Shard(QueueKind, u16),
}

impl QueueName {
    /// The unsharded work queues, in a stable order.
    pub const ALL: [QueueName; 2] = [QueueName::Deliveries, QueueName::Retries];

    /// The unsharded queue of a kind.
    pub fn unsharded(kind: QueueKind) -> Self {
        match kind {
            QueueKind::Deliveries => QueueName::Deliveries,
            QueueKind::Retries => QueueName::Retries,
        }
    }

    /// What the queue holds.
    pub fn kind(self) -> QueueKind {
        match self {
            QueueName::Deliveries => QueueKind::Deliveries,
            QueueName::Retries => QueueKind::Retries,
            QueueName::Shard(kind, _) => kind,
        }
    }

    /// The shard index, `None` for an unsharded queue.
    pub fn shard(self) -> Option<u16> {
        match self {
            QueueName::Shard(_, shard) => Some(shard),
            _ => None,
        }
    }

    /// Every queue a consumer of `shards` shard queues serves: both unsharded queues,
    /// then every shard of both kinds, deliveries and retries interleaved.
    pub fn consumed(shards: u16) -> Vec<QueueName> {
        let mut queues = QueueName::ALL.to_vec();
        for shard in 0..shards.min(MAX_SHARDS) {
            for kind in QueueKind::ALL {
                queues.push(QueueName::Shard(kind, shard));
            }
        }
        queues
    }

    /// The short name of the queue, without any prefix: `"deliveries"`,
    /// `"retries.7"`. The one naming rule of the work queues.
    pub fn name(self) -> String {
        match self {
            QueueName::Shard(kind, shard) => format!("{}.{shard}", kind.as_str()),
            other => other.kind().as_str().to_owned(),
        }
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A message to publish: an opaque body and string headers (for instance the
/// W3C `traceparent`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The payload, carried unchanged.
    pub body: Vec<u8>,
    /// String headers, carried unchanged.
    pub headers: BTreeMap<String, String>,
}

impl OutgoingMessage {
    /// A message with this body and no headers.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            headers: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) one header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// What a consumer decided about a message; handed to the adapter's [`Acker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove it from the queue.
    Ack,
    /// Not processed now: put it back on the queue to be delivered again.
    Requeue,
    /// Cannot be processed: move it to the dead-letter queue.
    DeadLetter,
}

/// How an adapter settles one received message. Adapters implement it; the
/// services only see [`ReceivedMessage`].
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// Settles the message. An error means the settlement did not reach the
    /// broker (typically the connection it came from is gone): the message
    /// will be delivered again.
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BrokerError>;
}

/// A message taken from a queue, to be settled exactly once.
///
/// Dropping it without settling leaves it unacknowledged: the broker delivers
/// it again once the consumer's channel or connection closes.
pub struct ReceivedMessage {
    /// The payload as published.
    pub body: Vec<u8>,
    /// The string headers as published, plus string forms of any headers the
    /// broker added (RabbitMQ quorum queues add `x-delivery-count` on
    /// redelivery).
    pub headers: BTreeMap<String, String>,
    /// True if this message may have been delivered before (to this consumer
    /// or another one) without being acknowledged.
    pub redelivered: bool,
    acker: Box<dyn Acker>,
}

impl ReceivedMessage {
    /// Builds a received message; for adapters (and test doubles).
    pub fn new(
        body: Vec<u8>,
        headers: BTreeMap<String, String>,
        redelivered: bool,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            body,
            headers,
            redelivered,
            acker,
        }
    }

    /// Acknowledges the message: it leaves the queue for good.
    ///
    /// An error means the acknowledgement was lost (the channel it came on
    /// has closed); the message will be redelivered, which at-least-once
    /// consumers tolerate, so callers may log and ignore it.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.settle(Settlement::Ack).await
    }

    /// Puts the message back on its queue to be delivered again (negative
    /// acknowledgement with requeue). On RabbitMQ this counts towards the
    /// queue's delivery limit, past which the message is dead-lettered.
    pub async fn retry_later(self) -> Result<(), BrokerError> {
        self.acker.settle(Settlement::Requeue).await
    }

    /// Moves the message to the dead-letter queue (negative acknowledgement
    /// without requeue).
    pub async fn dead_letter(self) -> Result<(), BrokerError> {
        self.acker.settle(Settlement::DeadLetter).await
    }
}

impl fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceivedMessage")
            .field("body_len", &self.body.len())
            .field("headers", &self.headers)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

/// The messages of one consumer. It survives reconnections and ends only when
/// the broker is shut down.
///
/// Use it as a [`Stream`] (`futures::StreamExt::next`).
pub struct MessageStream(Pin<Box<dyn Stream<Item = ReceivedMessage> + Send>>);

impl MessageStream {
    /// Wraps an adapter's stream.
    pub fn new(stream: impl Stream<Item = ReceivedMessage> + Send + 'static) -> Self {
        Self(Box::pin(stream))
    }
}

impl Stream for MessageStream {
    type Item = ReceivedMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageStream")
    }
}

/// What a change subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeNotice {
    /// A change announced with [`Broker::announce`], body as announced.
    Change(Vec<u8>),
    /// The subscription was interrupted (a reconnection) and changes may have
    /// been missed: drop every cached entry. Changes announced after this
    /// notice are received.
    Resync,
}

/// The notices of one change subscription. It survives reconnections (with a
/// [`ChangeNotice::Resync`] after each) and ends only when the broker is shut
/// down.
pub struct ChangeStream(Pin<Box<dyn Stream<Item = ChangeNotice> + Send>>);

impl ChangeStream {
    /// Wraps an adapter's stream.
    pub fn new(stream: impl Stream<Item = ChangeNotice> + Send + 'static) -> Self {
        Self(Box::pin(stream))
    }
}

impl Stream for ChangeStream {
    type Item = ChangeNotice;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChangeStream")
    }
}

/// The queue port: everything the services need from a message broker.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes every message (persistently) to the queue and returns once
    /// the broker has confirmed every one. Messages are pipelined: all are
    /// sent, then all confirmations awaited.
    ///
    /// If the broker is currently unreachable it waits for the reconnection,
    /// for a bounded time, before failing. Any error (a message refused, the
    /// connection lost before every confirmation came) means some messages
    /// may not have been stored: the caller publishes the batch again
    /// (consumers deduplicate).
    async fn publish(
        &self,
        queue: QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(), BrokerError>;

    /// Starts a consumer of the queue with manual acknowledgement and at most
    /// `prefetch` unsettled messages at a time (0 is taken as 1).
    ///
    /// The stream survives reconnections: messages unsettled when the
    /// connection dropped are delivered again (with `redelivered` set), and
    /// settling one of them on the old connection returns an error the caller
    /// can ignore.
    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<MessageStream, BrokerError>;

    /// Announces a registry change to every subscriber of [`Broker::changes`];
    /// returns once the broker has confirmed it.
    async fn announce(&self, change: Vec<u8>) -> Result<(), BrokerError>;

    /// Subscribes to announced changes. Each call gets its own subscription,
    /// established before this returns, so every change announced afterwards
    /// is received (or covered by a [`ChangeNotice::Resync`]).
    async fn changes(&self) -> Result<ChangeStream, BrokerError>;

    /// Ok when the broker is reachable now (for `/readyz`).
    async fn ping(&self) -> Result<(), BrokerError>;

    /// Approximate number of messages ready for delivery in the queue (not
    /// counting delivered but unsettled ones), for metrics and autoscaling.
    async fn queue_depth(&self, queue: QueueName) -> Result<u64, BrokerError>;

    /// Number of messages in the dead-letter queue: poison messages a consumer
    /// dead-lettered or that went past the delivery limit (for metrics and alerts).
    async fn dead_letter_depth(&self) -> Result<u64, BrokerError>;

    /// The configured number of shard queues per kind (`delivery_shards`): publishers
    /// route to shards `0..delivery_shards()`.
    fn delivery_shards(&self) -> u16;

    /// How many shard queues per kind consumers must serve: [`Broker::delivery_shards`],
    /// or more when shard queues of a former, higher setting still exist (RabbitMQ) or
    /// still hold messages (embedded), so lowering the setting strands nothing.
    async fn consumed_shards(&self) -> Result<u16, BrokerError>;

    /// Unix milliseconds at which the oldest message of the queue was published, when
    /// the backend can tell (embedded: yes; RabbitMQ: `None`).
    async fn oldest_published_ms(&self, _queue: QueueName) -> Result<Option<i64>, BrokerError> {
        Ok(None)
    }

    /// Messages this process knows to be waiting in the shard queues of both kinds, from
    /// memory: `None` from an adapter; the [`shards::ShardRouter`] answers from the depth
    /// snapshot it keeps for routing (read every [`shards::REFRESH_INTERVAL`], plus what
    /// it routed since), so nothing else needs to read the depths again.
    fn known_backlog(&self) -> Option<u64> {
        None
    }
}

/// Errors of the queue port. Messages say what happened and what it means
/// for the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The configuration cannot work (bad prefix, bad header, ...).
    #[error("invalid broker configuration: {0}")]
    InvalidConfig(String),

    /// A message cannot be sent as given (for instance a header name longer
    /// than AMQP allows). Retrying will not help.
    #[error("message {index} of the batch cannot be published: {reason}")]
    InvalidMessage {
        /// Position of the message in the batch.
        index: usize,
        /// Why it cannot be sent.
        reason: String,
    },

    /// The broker could not be reached within the allowed time.
    #[error("message broker unavailable after waiting {waited:?}: {reason}")]
    Unavailable {
        /// How long the call waited for a connection.
        waited: Duration,
        /// The last connection error seen, or why the broker is unreachable.
        reason: String,
    },

    /// The first connection failed in a way retrying cannot fix (refused credentials, no
    /// such vhost, a conflicting topology); the message says what to check.
    #[error("{0}")]
    Refused(String),

    /// The broker refused to store a published message (negative confirm).
    #[error(
        "the broker refused message {index} of a batch of {total} for {target} (nack); publish the batch again"
    )]
    Nacked {
        /// Position of the first refused message in the batch.
        index: usize,
        /// Size of the batch.
        total: usize,
        /// Where it was published.
        target: String,
    },

    /// A published message reached no queue: the topology is missing.
    #[error(
        "message {index} of the batch could not be routed to {target}: the queue does not exist (was the topology deleted?)"
    )]
    Unroutable {
        /// Position of the message in the batch.
        index: usize,
        /// Where it was published.
        target: String,
    },

    /// The message was received on a channel or connection that has closed
    /// since, so it cannot be settled any more; the broker redelivers it.
    #[error(
        "cannot settle the message: the channel it was received on has closed; it will be redelivered"
    )]
    StaleDelivery,

    /// The broker handle was closed.
    #[error("the broker connection has been shut down")]
    Closed,

    /// An operation failed at the broker or in the client library.
    #[error("broker error while trying to {context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BrokerError {
    /// Builds a [`BrokerError::Backend`].
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BrokerError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }

    /// True if trying again later may succeed (connection trouble, a refused
    /// message); false for errors that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            BrokerError::InvalidConfig(_)
                | BrokerError::InvalidMessage { .. }
                | BrokerError::Refused(_)
                | BrokerError::Closed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_stable() {
        assert_eq!(QueueName::Deliveries.name(), "deliveries");
        assert_eq!(QueueName::Retries.to_string(), "retries");
        assert_eq!(QueueName::Shard(QueueKind::Retries, 7).name(), "retries.7");
        assert_eq!(QueueName::consumed(2).len(), 6);
    }

    #[test]
    fn errors_read_well() {
        let e = BrokerError::Unroutable {
            index: 3,
            target: "exchange t.work, routing key deliveries".into(),
        };
        assert!(e.to_string().contains("message 3"));
        assert!(e.is_transient());
        assert!(!BrokerError::Closed.is_transient());
    }
}
