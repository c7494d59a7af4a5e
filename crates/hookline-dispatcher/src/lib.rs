//! The dispatcher: the worker that turns delivery messages into signed HTTP POSTs.
//!
//! It consumes every shard queue of first attempts (`deliveries.<i>`) and of due retries
//! (`retries.<i>`), and the unsharded `deliveries` / `retries` of older versions, each
//! with its own bounded prefetch, signs each payload per Standard Webhooks with every live secret of the
//! subscription, POSTs it through one pooled client with a timeout and no redirects, and
//! records the attempt together with what happens next (success, a retry at a time, or
//! failure) through a batching writer that acks each message only once its outcome is
//! committed. Subscriptions come from a cache kept fresh by the registry's change
//! announcements.
//!
//! The process-wide `concurrency` permits are granted round robin over the consumed
//! queues that have messages waiting for one ([`fair`]), so a tenant's backlog on its
//! shards does not delay another tenant's message on another shard.
//!
//! Before a request takes one of the process-wide `concurrency` permits it must be
//! admitted for its subscription: circuit breaker, in-flight limit, rate limit
//! ([`limits`]). A message that is not admitted is deferred (recorded as a retry at a
//! time, without an attempt, and acked) rather than held, so a hanging endpoint holds
//! its own `max_in_flight` requests (and, for a few milliseconds each, the messages
//! waiting for one of them), and healthy endpoints keep the rest of the process. That
//! admission state (and the circuit breaker's) is per process; everything durable is in
//! the store: add replicas to add throughput.
//!
//! ```text
//! deliveries.<i> ─┐                    ┌─ decode · cache · admit ─┬─ defer (no attempt) ──┐
//!                 ├─ consume(prefetch) ┤  (circuit · in flight ·  │                       ├─▶ writer ─ record_outcomes ─▶ ack
//! retries.<i> ────┘   (one per queue)  └─  rate) ──▶ fair permit (concurrency) · sign · POST ──┘   (batch | linger)
//! ```

mod body;
mod cache;
mod circuit;
mod circuit_record;
mod clients;
mod config;
mod failure;
mod fair;
mod http;
mod limits;
pub mod metrics;
mod ordered;
mod worker;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hookline_broker::{Broker, BrokerError, QueueName};
use hookline_store::port::{DeliveryStore, EventStore, RegistryStore};
use reqwest::header::HeaderValue;
use tokio::sync::Semaphore;

use crate::fair::FairPermits;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{CircuitConfig, DispatcherConfig, ReceiverTls};

use crate::cache::SubscriptionCache;
use crate::limits::Limits;
use crate::worker::Worker;
use hookline_changes::RegistryChanges;

/// How long, at shutdown, the outcomes of drained deliveries get to be written (after
/// [`DispatcherConfig::shutdown_drain`]); what is not written by then is not acked, so
/// the broker delivers it again.
pub const OUTCOME_FLUSH: Duration = Duration::from_secs(5);

/// Why a dispatcher cannot start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("invalid dispatcher configuration: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    HttpClient(String),
    #[error("cannot consume the {queue} queue: {source}")]
    Consume {
        queue: QueueName,
        #[source]
        source: BrokerError,
    },
    #[error("the message broker shut down while the dispatcher was running")]
    BrokerClosed,
}

/// Lets in-flight deliveries finish (for at most `grace`), then lets the writer write and
/// ack their outcomes (for at most [`OUTCOME_FLUSH`]). What is left is redelivered.
async fn wind_down(
    mut tasks: JoinSet<()>,
    grace: Duration,
    worker: Arc<Worker>,
    mut writer: tokio::task::JoinHandle<()>,
) {
    tracing::info!(
        in_flight = tasks.len(),
        "dispatcher stopping; finishing in-flight deliveries"
    );
    let drained = tokio::time::timeout(grace, async {
        while let Some(done) = tasks.join_next().await {
            report_task_end(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = tasks.len(),
            "in-flight deliveries did not finish in {grace:?}; they will be redelivered"
        );
        tasks.shutdown().await;
    }
    // The tasks are done, so this drops the last sender: the writer writes what it
    // holds and ends.
    drop(worker);
    if tokio::time::timeout(OUTCOME_FLUSH, &mut writer)
        .await
        .is_err()
    {
        tracing::warn!("the outcome writer did not finish; its messages will be redelivered");
        writer.abort();
    }
}

/// A dispatcher, ready to [`run`](Dispatcher::run).
pub struct Dispatcher {
    cfg: DispatcherConfig,
    client: Arc<clients::Clients>,
    cache: Arc<SubscriptionCache>,
    registry: Arc<dyn RegistryStore>,
    deliveries: Arc<dyn DeliveryStore>,
    broker: Arc<dyn Broker>,
    /// The process's registry change stream; `None`: the dispatcher follows the broker's
    /// changes itself when it runs.
    changes: Option<RegistryChanges>,
    /// Where the jobs promoted by ordered subscriptions are cleared from the outbox once
    /// published; `None`: the outbox relay publishes them.
    events: Option<Arc<dyn EventStore>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// Checks the configuration and builds the HTTP client. Builds on the process's
    /// rustls crypto provider, installing ring's if none is installed yet.
    pub fn new(
        cfg: DispatcherConfig,
        registry: Arc<dyn RegistryStore>,
        deliveries: Arc<dyn DeliveryStore>,
        broker: Arc<dyn Broker>,
    ) -> Result<Self, DispatcherError> {
        if cfg.concurrency == 0 || cfg.concurrency > Semaphore::MAX_PERMITS {
            return Err(DispatcherError::InvalidConfig(format!(
                "concurrency must be between 1 and {}, got {}",
                Semaphore::MAX_PERMITS,
                cfg.concurrency
            )));
        }
        if cfg.write_batch == 0 {
            return Err(DispatcherError::InvalidConfig(
                "write_batch must be at least 1".into(),
            ));
        }
        if cfg.request_timeout.is_zero() {
            return Err(DispatcherError::InvalidConfig(
                "request_timeout must be longer than zero".into(),
            ));
        }
        if cfg.default_max_in_flight == 0 {
            return Err(DispatcherError::InvalidConfig(
                "default_max_in_flight must be at least 1".into(),
            ));
        }
        if cfg.defer_delay.is_zero() {
            return Err(DispatcherError::InvalidConfig(
                "defer_delay must be longer than zero".into(),
            ));
        }
        let circuit = &cfg.circuit;
        if circuit.failure_ratio_percent > 100 {
            return Err(DispatcherError::InvalidConfig(format!(
                "circuit.failure_ratio_percent must be between 0 and 100, got {}",
                circuit.failure_ratio_percent
            )));
        }
        if circuit.enabled()
            && (circuit.cool_down.is_zero() || circuit.max_cool_down < circuit.cool_down)
        {
            return Err(DispatcherError::InvalidConfig(format!(
                "circuit.cool_down must be longer than zero and at most circuit.max_cool_down, got {:?} and {:?}",
                circuit.cool_down, circuit.max_cool_down
            )));
        }
        if circuit.failure_ratio_percent > 0 && circuit.window.is_zero() {
            return Err(DispatcherError::InvalidConfig(
                "circuit.window must be longer than zero".into(),
            ));
        }
        let user_agent = HeaderValue::from_str(&cfg.user_agent).map_err(|_| {
            DispatcherError::InvalidConfig(format!(
                "user_agent {:?} is not a valid HTTP header value",
                cfg.user_agent
            ))
        })?;
        let client = Arc::new(clients::Clients::new(&cfg).map_err(DispatcherError::HttpClient)?);
        let cache = Arc::new(SubscriptionCache::new(registry.clone(), user_agent));
        Ok(Self {
            cfg,
            client,
            cache,
            registry,
            deliveries,
            broker,
            changes: None,
            events: None,
        })
    }

    /// Publishes the deliveries that ordered subscriptions promote as soon as their
    /// predecessor's outcome is committed, clearing them from `events`' outbox (without
    /// it, the outbox relay publishes them after its grace period).
    pub fn with_outbox(mut self, events: Arc<dyn EventStore>) -> Self {
        self.events = Some(events);
        self
    }

    /// Keeps the subscription cache fresh from `changes`, the process's one follower of
    /// the registry change stream.
    pub fn with_changes(mut self, changes: RegistryChanges) -> Self {
        self.changes = Some(changes);
        self
    }

    /// Consumes `deliveries` and `retries` until `shutdown` is cancelled, then stops
    /// taking messages, lets in-flight deliveries finish (for at most
    /// [`DispatcherConfig::shutdown_drain`]), writes and acks their outcomes (for at most
    /// [`OUTCOME_FLUSH`]), and returns. Anything left unacked is redelivered by the broker.
    ///
    /// Fails at start if a queue cannot be consumed, and with
    /// [`DispatcherError::BrokerClosed`] if the broker shuts down underneath it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DispatcherError> {
        let Self {
            cfg,
            client,
            cache,
            registry,
            deliveries,
            broker,
            changes,
            events,
        } = self;

        let mut messages = consume_all(broker.as_ref(), &cfg).await?;
        let lanes = messages.len();
        let mut messages = futures::stream::select_all(messages.drain(..));

        let changes = match changes {
            Some(changes) => changes,
            None => RegistryChanges::follow(broker.as_ref(), shutdown.clone()).await,
        };
        let follower = cache.clone().follow(&changes, shutdown.clone());
        let (writer_tx, writer) = writer::spawn(
            deliveries.clone(),
            ordered::Promoter::new(broker.clone(), events),
            cfg.write_batch,
            cfg.write_linger,
            cfg.writes_in_flight,
        );
        let recorder = circuit_record::CircuitRecorder::spawn(registry.clone());
        let worker = Arc::new(Worker {
            clients: client,
            cache,
            registry,
            deliveries,
            broker,
            writer: writer_tx,
            shutdown: shutdown.clone(),
            limits: Limits::recording(&cfg, Some(recorder)),
            permits: FairPermits::new(cfg.concurrency, lanes),
        });
        tracing::info!(
            concurrency = cfg.concurrency,
            queues = lanes,
            prefetch = cfg.prefetch,
            shard_prefetch = cfg.shard_prefetch,
            default_max_in_flight = cfg.default_max_in_flight,
            "dispatcher consuming deliveries and retries"
        );

        // Every message gets its task at once: the broker's prefetch bounds how many are
        // unsettled (and so how many tasks exist), and a task waits for a process-wide
        // permit only after its subscription admitted it, so a subscription at its limit
        // never stops the consumer or holds a permit.
        let mut tasks = JoinSet::new();
        let mut broker_closed = false;
        loop {
            while let Some(done) = tasks.try_join_next() {
                report_task_end(done);
            }
            let (lane, message) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                message = messages.next() => match message {
                    Some(m) => m,
                    None => {
                        broker_closed = true;
                        break;
                    }
                },
            };
            let worker = worker.clone();
            let in_flight = metrics::InFlight::enter();
            tasks.spawn(async move {
                worker.handle(message, lane).await;
                drop(in_flight);
            });
        }

        wind_down(tasks, cfg.shutdown_drain, worker, writer).await;
        follower.abort();
        // Dropping the consumers last: acks go out on their channels until here.
        drop(messages);
        tracing::info!("dispatcher stopped");
        if broker_closed && !shutdown.is_cancelled() {
            return Err(DispatcherError::BrokerClosed);
        }
        Ok(())
    }
}

/// A consumer of every queue to serve, each message tagged with its queue's lane: the
/// unsharded queues with `prefetch`, every shard queue (of the shard count the broker
/// says must be served, see [`Broker::consumed_shards`]) with `shard_prefetch`.
async fn consume_all(
    broker: &dyn Broker,
    cfg: &DispatcherConfig,
) -> Result<
    Vec<futures::stream::BoxStream<'static, (usize, hookline_broker::ReceivedMessage)>>,
    DispatcherError,
> {
    let shards = broker
        .consumed_shards()
        .await
        .map_err(|source| DispatcherError::Consume {
            queue: QueueName::Deliveries,
            source,
        })?;
    if shards > broker.delivery_shards() {
        tracing::warn!(
            configured = broker.delivery_shards(),
            consumed = shards,
            "shard queues of a former, higher delivery_shards still exist; consuming them too (delete them once empty, or set delivery_shards back)"
        );
    }
    let mut streams = Vec::new();
    for (lane, queue) in QueueName::consumed(shards).into_iter().enumerate() {
        let prefetch = match queue.shard() {
            Some(_) => cfg.shard_prefetch,
            None => cfg.prefetch,
        };
        let stream = broker
            .consume(queue, prefetch)
            .await
            .map_err(|source| DispatcherError::Consume { queue, source })?;
        let received = metrics::ShardReceived::new(queue);
        streams.push(
            stream
                .map(move |message| {
                    received.record(&message);
                    (lane, message)
                })
                .boxed(),
        );
    }
    Ok(streams)
}

fn report_task_end(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result
        && e.is_panic()
    {
        tracing::error!(error = %e, "a delivery task panicked; its message will be redelivered");
    }
}
