//! A consumer subscription that survives reconnections: it re-subscribes on each
//! new connection, for a work queue or for the changes exchange.

use std::fmt;
use std::sync::Arc;

use backon::BackoffBuilder;
use futures::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::{info, warn};

use super::reconnect::{Live, Shared};
use super::topology::short;
use crate::BrokerError;

/// What a subscription consumes.
pub(super) enum Target {
    /// A work queue, manual acknowledgement.
    Queue { name: String, prefetch: u16 },
    /// A private queue bound to the changes exchange, automatic
    /// acknowledgement (a missed change is covered by a resync).
    Changes,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Queue { name, .. } => write!(f, "queue {name}"),
            Target::Changes => f.write_str("the change announcements"),
        }
    }
}

impl Target {
    /// Opens a channel on `live` and starts consuming.
    async fn open(&self, shared: &Shared, live: &Live) -> lapin::Result<Consumer> {
        let channel = live.channel().await?;
        match self {
            Target::Queue { name, prefetch } => {
                channel
                    .basic_qos(*prefetch, BasicQosOptions::default())
                    .await?;
                channel
                    .basic_consume(
                        short(name),
                        ShortString::from(""),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            }
            Target::Changes => {
                // Explicitly classic: a vhost whose default queue type is
                // quorum would refuse an exclusive queue otherwise.
                let mut arguments = FieldTable::default();
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(LongString::from("classic")),
                );
                let queue = channel
                    .queue_declare(
                        ShortString::from(""),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..Default::default()
                        },
                        arguments,
                    )
                    .await?;
                channel
                    .queue_bind(
                        queue.name().clone(),
                        short(&shared.topology.changes_exchange),
                        ShortString::from(""),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .basic_consume(
                        queue.name().clone(),
                        ShortString::from(""),
                        BasicConsumeOptions {
                            no_ack: true,
                            exclusive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            }
        }
    }
}

/// What [`Subscription::next`] yields.
#[allow(
    clippy::large_enum_variant,
    reason = "moved once per message straight out of `next`; boxing would only add an allocation"
)]
pub(super) enum Next {
    Delivery(Delivery),
    /// The consumer was re-established after an interruption.
    Resubscribed,
}

/// A consumer that re-subscribes by itself whenever its channel or connection
/// ends, until the broker shuts down.
pub(super) struct Subscription {
    shared: Arc<Shared>,
    target: Target,
    consumer: Option<Consumer>,
}

impl Subscription {
    /// Subscribes now (waiting a bounded time for a connection), so that
    /// errors such as a missing queue surface to the caller.
    pub(super) async fn start(shared: Arc<Shared>, target: Target) -> Result<Self, BrokerError> {
        let live = shared.live(Some(shared.cfg.reconnect_max_wait)).await?;
        let consumer = target
            .open(&shared, &live)
            .await
            .map_err(|e| BrokerError::backend(format!("start consuming {target}"), e))?;
        Ok(Self {
            shared,
            target,
            consumer: Some(consumer),
        })
    }

    /// The next delivery; `None` once the broker is shut down.
    pub(super) async fn next(&mut self) -> Option<Next> {
        loop {
            let Some(consumer) = self.consumer.as_mut() else {
                self.consumer = Some(self.resubscribe().await?);
                return Some(Next::Resubscribed);
            };
            let item = tokio::select! {
                () = self.shared.shutdown.cancelled() => return None,
                item = consumer.next() => item,
            };
            match item {
                Some(Ok(delivery)) => return Some(Next::Delivery(delivery)),
                Some(Err(error)) => {
                    if self.shared.shutdown.is_cancelled() {
                        return None;
                    }
                    warn!(subscription = %self.target, %error, "consumer interrupted; subscribing again");
                }
                None => {
                    if self.shared.shutdown.is_cancelled() {
                        return None;
                    }
                    warn!(subscription = %self.target, "consumer ended by the broker; subscribing again");
                }
            }
            self.consumer = None;
        }
    }

    /// Subscribes again on the live connection, waiting for one and backing
    /// off between failed attempts; `None` at shutdown.
    async fn resubscribe(&self) -> Option<Consumer> {
        let mut backoff = self.shared.backoff().build();
        loop {
            let live = self.shared.live(None).await.ok()?;
            match self.target.open(&self.shared, &live).await {
                Ok(consumer) => {
                    info!(subscription = %self.target, generation = live.generation, "consumer subscribed again");
                    return Some(consumer);
                }
                Err(error) => {
                    let delay = backoff
                        .next()
                        .unwrap_or(self.shared.cfg.reconnect_max_backoff);
                    warn!(subscription = %self.target, %error, retry_in = ?delay, "cannot subscribe; retrying");
                    tokio::select! {
                        () = self.shared.shutdown.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
