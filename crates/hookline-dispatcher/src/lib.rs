//! The dispatcher: the worker that turns delivery messages into signed HTTP POSTs.
//!
//! It consumes `deliveries` (first attempts) and `retries` (due retries) with bounded
//! prefetch, signs each payload per Standard Webhooks with every live secret of the
//! subscription, POSTs it through one pooled client with a timeout and no redirects, and
//! records the attempt together with what happens next (success, a retry at a time, or
//! failure) through a batching writer that acks each message only once its outcome is
//! committed. Subscriptions come from a cache kept fresh by the registry's change
//! announcements. It keeps no state of its own: add replicas to add throughput.
//!
//! ```text
//! deliveries ─┐                    ┌─ semaphore (concurrency) ─┐
//!             ├─ consume(prefetch) ┤  decode · cache · sign ·   ├─▶ writer ─ record_outcomes ─▶ ack
//! retries ────┘                    └─ POST · decide ────────────┘   (batch | linger)
//! ```

mod cache;
mod config;
mod http;
pub mod metrics;
mod worker;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hookline_broker::{Broker, BrokerError, QueueName};
use hookline_store::port::{DeliveryStore, RegistryStore};
use reqwest::header::HeaderValue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::DispatcherConfig;

use crate::cache::SubscriptionCache;
use crate::worker::Worker;

/// Extra time, beyond the request timeout, that in-flight deliveries get at shutdown.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// Why a dispatcher cannot start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("invalid dispatcher configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot consume the {queue} queue: {source}")]
    Consume {
        queue: QueueName,
        #[source]
        source: BrokerError,
    },
    #[error("the message broker shut down while the dispatcher was running")]
    BrokerClosed,
}

/// A dispatcher, ready to [`run`](Dispatcher::run).
pub struct Dispatcher {
    cfg: DispatcherConfig,
    client: reqwest::Client,
    cache: Arc<SubscriptionCache>,
    registry: Arc<dyn RegistryStore>,
    deliveries: Arc<dyn DeliveryStore>,
    broker: Arc<dyn Broker>,
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
        let user_agent = HeaderValue::from_str(&cfg.user_agent).map_err(|_| {
            DispatcherError::InvalidConfig(format!(
                "user_agent {:?} is not a valid HTTP header value",
                cfg.user_agent
            ))
        })?;
        let client =
            http::build_client(cfg.request_timeout).map_err(DispatcherError::HttpClient)?;
        let cache = Arc::new(SubscriptionCache::new(registry.clone(), user_agent));
        Ok(Self {
            cfg,
            client,
            cache,
            registry,
            deliveries,
            broker,
        })
    }

    /// Consumes `deliveries` and `retries` until `shutdown` is cancelled, then stops
    /// taking messages, lets in-flight deliveries finish (for at most the request timeout
    /// and a margin), writes and acks their outcomes, and returns. Anything left unacked
    /// is redelivered by the broker.
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
        } = self;

        let mut streams = Vec::with_capacity(QueueName::ALL.len());
        for queue in [QueueName::Deliveries, QueueName::Retries] {
            let stream = broker
                .consume(queue, cfg.prefetch)
                .await
                .map_err(|source| DispatcherError::Consume { queue, source })?;
            streams.push(stream);
        }
        let mut messages = futures::stream::select_all(streams);

        let follower = tokio::spawn(cache.clone().follow(broker.clone(), shutdown.clone()));
        let (writer_tx, writer) = writer::spawn(deliveries, cfg.write_batch, cfg.write_linger);
        let worker = Arc::new(Worker {
            client,
            cache,
            registry,
            broker,
            writer: writer_tx,
            shutdown: shutdown.clone(),
        });
        tracing::info!(
            concurrency = cfg.concurrency,
            prefetch = cfg.prefetch,
            "dispatcher consuming deliveries and retries"
        );

        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        let mut tasks = JoinSet::new();
        let mut broker_closed = false;
        loop {
            while let Some(done) = tasks.try_join_next() {
                report_task_end(done);
            }
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break, // never closed; stop rather than spin
                },
            };
            let message = tokio::select! {
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
                worker.handle(message).await;
                drop(in_flight);
                drop(permit);
            });
        }

        tracing::info!(
            in_flight = tasks.len(),
            "dispatcher stopping; finishing in-flight deliveries"
        );
        let grace = cfg.request_timeout + SHUTDOWN_MARGIN;
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
        let mut writer = writer;
        if tokio::time::timeout(writer::WRITE_RETRY_TOTAL + SHUTDOWN_MARGIN, &mut writer)
            .await
            .is_err()
        {
            tracing::warn!("the outcome writer did not finish; its messages will be redelivered");
            writer.abort();
        }
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

fn report_task_end(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result
        && e.is_panic()
    {
        tracing::error!(error = %e, "a delivery task panicked; its message will be redelivered");
    }
}
