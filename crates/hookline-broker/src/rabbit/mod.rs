//! The RabbitMQ adapter of the queue port, on lapin.
//!
//! [`RabbitBroker`] implements [`Broker`] with durable quorum queues,
//! persistent messages, publisher confirms, consumers with manual
//! acknowledgement and bounded prefetch, and a fanout exchange for registry
//! changes. The connection itself is owned by the manager task of
//! [`reconnect`]; this module turns port calls into AMQP operations on
//! whatever connection is live, and makes consumer streams re-subscribe after
//! a reconnection.

mod message;
mod reconnect;
mod subscription;
mod topology;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Confirmation};
use tokio::task::JoinHandle;

use self::message::{properties, received};
use self::reconnect::{Live, Shared};
use self::subscription::{Next, Subscription, Target};
use self::topology::{Topology, short};
use crate::{
    Broker, BrokerError, ChangeNotice, ChangeStream, MessageStream, OutgoingMessage, QueueName,
};

/// Settings of the RabbitMQ adapter. [`Default`] works on a laptop.
#[derive(Clone)]
pub struct RabbitConfig {
    /// AMQP URL, `amqp://user:password@host:5672/%2f` (`amqps://` for TLS;
    /// `?heartbeat=10` and other query parameters are honoured).
    pub url: String,
    /// Prefix of every queue and exchange name, so that tests and tenants of
    /// one broker never collide: ASCII letters, digits, `-`, `_`, `.`, `:`.
    pub prefix: String,
    /// Client-provided connection name, shown by `rabbitmqctl list_connections
    /// client_properties` and the management UI.
    pub connection_name: String,
    /// How long `publish`, `consume`, `changes` and `connect` wait for a
    /// connection when RabbitMQ is unreachable before failing.
    pub reconnect_max_wait: Duration,
    /// First delay between reconnection attempts.
    pub reconnect_min_backoff: Duration,
    /// Longest delay between reconnection attempts (before jitter, which adds
    /// up to as much again).
    pub reconnect_max_backoff: Duration,
    /// Time allowed for one connection attempt (TCP, TLS, AMQP handshake).
    pub connect_timeout: Duration,
    /// Time allowed for a publish to be sent and confirmed once connected
    /// (RabbitMQ withholds confirms while a resource alarm blocks publishers).
    pub confirm_timeout: Duration,
    /// Deliveries of one message after which a work queue dead-letters it
    /// (`x-delivery-limit`): a poison message that keeps crashing consumers
    /// ends in the dead-letter queue. Fixed when the queues are created.
    pub delivery_limit: u32,
    /// What `amqps://` trusts and presents (see [`crate::amqp_tls`]).
    pub tls: crate::AmqpTlsFiles,
    /// Shard queues per kind (`P.deliveries.<i>`, `P.retries.<i>`), declared at
    /// every connection: 1 to [`crate::MAX_SHARDS`].
    pub delivery_shards: u16,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            prefix: "hookline".to_owned(),
            connection_name: "hookline".to_owned(),
            reconnect_max_wait: Duration::from_secs(30),
            reconnect_min_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            delivery_limit: 20,
            tls: crate::AmqpTlsFiles::default(),
            delivery_shards: crate::shards::DEFAULT_SHARDS,
        }
    }
}

impl RabbitConfig {
    /// Defaults with this URL and prefix.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            ..Self::default()
        }
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &hookline_core::redact::url(&self.url))
            .field("prefix", &self.prefix)
            .field("connection_name", &self.connection_name)
            .field("reconnect_max_wait", &self.reconnect_max_wait)
            .field("reconnect_min_backoff", &self.reconnect_min_backoff)
            .field("reconnect_max_backoff", &self.reconnect_max_backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("delivery_limit", &self.delivery_limit)
            .field("tls", &self.tls)
            .field("delivery_shards", &self.delivery_shards)
            .finish()
    }
}

/// The RabbitMQ adapter. Create it with [`RabbitBroker::connect`]; share it
/// as `Arc<dyn Broker>`. Dropping it shuts it down like [`RabbitBroker::close`]
/// but without waiting.
pub struct RabbitBroker {
    shared: Arc<Shared>,
    manager: Mutex<Option<JoinHandle<()>>>,
    /// The channel queue depths are read on, kept open between reads (the shard router
    /// reads every shard's depth several times a second) and opened again after a read
    /// that closed it (a missing queue) or a reconnection.
    probe: tokio::sync::Mutex<Option<(Arc<Live>, lapin::Channel)>>,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl RabbitBroker {
    /// Connects and declares the topology (idempotently: every process
    /// declares it). Retries with backoff for up to
    /// [`RabbitConfig::reconnect_max_wait`]; fails at once on an invalid
    /// configuration, refused credentials or a conflicting existing topology.
    /// The connection is then kept up by a background task, which needs a
    /// tokio runtime.
    pub async fn connect(cfg: RabbitConfig) -> Result<Self, BrokerError> {
        let topology = Topology::new(&cfg.prefix, cfg.delivery_limit, cfg.delivery_shards)?;
        let uri: AMQPUri = cfg.url.parse().map_err(|e| {
            BrokerError::InvalidConfig(format!(
                "the AMQP URL {} is not valid: {e}",
                hookline_core::redact::url(&cfg.url)
            ))
        })?;
        if cfg.reconnect_min_backoff.is_zero()
            || cfg.reconnect_max_backoff < cfg.reconnect_min_backoff
        {
            return Err(BrokerError::InvalidConfig(format!(
                "the reconnection backoff must satisfy 0 < min ({:?}) <= max ({:?})",
                cfg.reconnect_min_backoff, cfg.reconnect_max_backoff
            )));
        }
        let tls = crate::amqp_tls::tls_config(&cfg.url, &cfg.tls)?;
        let max_wait = cfg.reconnect_max_wait;
        let shared = Arc::new(Shared::new(cfg, uri, tls, topology));
        let manager = tokio::spawn(reconnect::run(shared.clone()));
        match shared.live(Some(max_wait)).await {
            Ok(_) => Ok(Self {
                shared,
                manager: Mutex::new(Some(manager)),
                probe: tokio::sync::Mutex::new(None),
            }),
            Err(error) => {
                shared.shutdown.cancel();
                let _ = manager.await;
                Err(error)
            }
        }
    }

    /// The configured name prefix.
    pub fn prefix(&self) -> &str {
        &self.shared.cfg.prefix
    }

    /// The full RabbitMQ name of the dead-letter queue (`{prefix}.dead-letter`).
    pub fn dead_letter_queue_name(&self) -> &str {
        &self.shared.topology.dead_letter_queue
    }

    /// Number of messages in the dead-letter queue (for metrics and alerts).
    pub async fn dead_letter_depth(&self) -> Result<u64, BrokerError> {
        self.passive_depth(&self.shared.topology.dead_letter_queue)
            .await
    }

    /// Deletes every queue and exchange of this prefix, with their messages.
    /// Meant for tests; a later reconnection would declare them again, so
    /// [`close`](Self::close) the broker afterwards.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        let live = self.live().await?;
        let channel = live
            .channel()
            .await
            .map_err(|e| BrokerError::backend("open a channel", e))?;
        self.shared
            .topology
            .delete(&channel)
            .await
            .map_err(|e| BrokerError::backend("delete the topology", e))?;
        let _ = channel.close(200, "topology deleted".into()).await;
        Ok(())
    }

    /// Shuts down: ends every stream, closes the connection (unsettled
    /// messages go back to their queues) and waits for the manager task.
    pub async fn close(&self) {
        self.shared.shutdown.cancel();
        let manager = self
            .manager
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(manager) = manager {
            let _ = manager.await;
        }
    }

    async fn live(&self) -> Result<Arc<Live>, BrokerError> {
        self.shared
            .live(Some(self.shared.cfg.reconnect_max_wait))
            .await
    }

    async fn passive_depth(&self, queue: &str) -> Result<u64, BrokerError> {
        let live = self.shared.current()?;
        let mut probe = self.probe.lock().await;
        let reusable = match &*probe {
            Some((on, channel)) => Arc::ptr_eq(on, &live) && channel.status().connected(),
            None => false,
        };
        if !reusable {
            let channel = live
                .channel()
                .await
                .map_err(|e| BrokerError::backend("open a channel", e))?;
            *probe = Some((live.clone(), channel));
        }
        let Some((_, channel)) = probe.as_ref() else {
            return Err(BrokerError::backend("open a channel", "no probe channel"));
        };
        let declared = channel
            .queue_declare(
                short(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(declared) => Ok(u64::from(declared.message_count())),
            Err(e) => {
                // A missing queue closes the channel: open another next time.
                *probe = None;
                Err(BrokerError::backend(format!("look up queue {queue}"), e))
            }
        }
    }

    /// Publishes with confirms: all messages sent, then all confirms awaited.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: Vec<OutgoingMessage>,
        persistent: bool,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        let total = messages.len();
        if total == 0 {
            return Ok(());
        }
        let prepared = messages
            .into_iter()
            .enumerate()
            .map(|(index, message)| {
                let properties = properties(&message.headers, persistent)
                    .map_err(|reason| BrokerError::InvalidMessage { index, reason })?;
                Ok((message.body, properties))
            })
            .collect::<Result<Vec<_>, BrokerError>>()?;

        let live = self.live().await?;
        let limit = self.shared.cfg.confirm_timeout;
        let sent_and_confirmed =
            self.send_and_confirm(&live, exchange, routing_key, prepared, mandatory);
        match tokio::time::timeout(limit, sent_and_confirmed).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::backend(
                format!("publish {total} messages to {exchange}"),
                format!(
                    "no confirmation within {limit:?} (is a resource alarm blocking publishers?)"
                ),
            )),
        }
    }

    async fn send_and_confirm(
        &self,
        live: &Live,
        exchange: &str,
        routing_key: &str,
        prepared: Vec<(Vec<u8>, BasicProperties)>,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        let total = prepared.len();
        let target = format!("exchange {exchange} (routing key {routing_key:?})");
        let channel = live
            .publisher()
            .await
            .map_err(|e| BrokerError::backend("open the publishing channel", e))?;
        let options = BasicPublishOptions {
            mandatory,
            immediate: false,
        };
        let mut confirms = Vec::with_capacity(total);
        for (index, (body, properties)) in prepared.into_iter().enumerate() {
            let confirm = channel
                .basic_publish(
                    short(exchange),
                    short(routing_key),
                    options,
                    &body,
                    properties,
                )
                .await
                .map_err(|e| {
                    BrokerError::backend(
                        format!("publish message {index} of {total} to {target}"),
                        e,
                    )
                })?;
            confirms.push(confirm);
        }
        for (index, confirm) in confirms.into_iter().enumerate() {
            let confirmation = confirm.await.map_err(|e| {
                BrokerError::backend(
                    format!("get the confirmation of message {index} of {total} to {target}"),
                    e,
                )
            })?;
            match confirmation {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_returned)) => {
                    return Err(BrokerError::Unroutable { index, target });
                }
                Confirmation::Nack(_) => {
                    return Err(BrokerError::Nacked {
                        index,
                        total,
                        target,
                    });
                }
                Confirmation::NotRequested => {
                    return Err(BrokerError::backend(
                        "get a publisher confirmation",
                        "the publishing channel is not in confirm mode",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Drop for RabbitBroker {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish(
        &self,
        queue: QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(), BrokerError> {
        let exchange = self.shared.topology.work_exchange.clone();
        self.publish_confirmed(&exchange, &queue.name(), messages, true, true)
            .await
    }

    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<MessageStream, BrokerError> {
        let target = Target::Queue {
            name: self.shared.topology.queue(queue),
            prefetch: prefetch.max(1),
        };
        let subscription = Subscription::start(self.shared.clone(), target).await?;
        let stream = futures::stream::unfold(subscription, |mut subscription| async move {
            loop {
                match subscription.next().await? {
                    // Prefetched before its channel died: it can no longer be
                    // settled and RabbitMQ has put it back; skip the work.
                    Next::Delivery(delivery) if delivery.acker.poisoned() => {}
                    Next::Delivery(delivery) => {
                        return Some((received(delivery), subscription));
                    }
                    Next::Resubscribed => {}
                }
            }
        });
        Ok(MessageStream::new(stream))
    }

    async fn announce(&self, change: Vec<u8>) -> Result<(), BrokerError> {
        let exchange = self.shared.topology.changes_exchange.clone();
        // Not mandatory: having no subscriber is fine.
        self.publish_confirmed(
            &exchange,
            "",
            vec![OutgoingMessage::new(change)],
            false,
            false,
        )
        .await
    }

    async fn changes(&self) -> Result<ChangeStream, BrokerError> {
        let subscription = Subscription::start(self.shared.clone(), Target::Changes).await?;
        let stream = futures::stream::unfold(subscription, |mut subscription| async move {
            let notice = match subscription.next().await? {
                Next::Delivery(delivery) => ChangeNotice::Change(delivery.data),
                Next::Resubscribed => ChangeNotice::Resync,
            };
            Some((notice, subscription))
        });
        Ok(ChangeStream::new(stream))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.shared.current().map(|_| ())
    }

    async fn queue_depth(&self, queue: QueueName) -> Result<u64, BrokerError> {
        self.passive_depth(&self.shared.topology.queue(queue)).await
    }

    fn delivery_shards(&self) -> u16 {
        self.shared.topology.shards
    }

    async fn consumed_shards(&self) -> Result<u16, BrokerError> {
        // Every process declares shards 0..its setting, so the shard queues that exist
        // are 0..the highest setting ever used: probe upwards until one is missing.
        let mut shards = self.shared.topology.shards;
        while shards < crate::MAX_SHARDS {
            let next = crate::QueueName::Shard(crate::QueueKind::Deliveries, shards);
            match self.passive_depth(&self.shared.topology.queue(next)).await {
                Ok(_) => shards += 1,
                // A missing queue closes the probing channel with NOT_FOUND.
                Err(BrokerError::Backend { .. }) => break,
                Err(other) => return Err(other),
            }
        }
        Ok(shards)
    }

    async fn dead_letter_depth(&self) -> Result<u64, BrokerError> {
        // The inherent method of the same name.
        RabbitBroker::dead_letter_depth(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_prints_no_password() {
        assert!(!format!("{:?}", RabbitConfig::default()).contains("guest:guest"));
    }
}
