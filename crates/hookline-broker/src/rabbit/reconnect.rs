//! The connection manager: one task owns the current RabbitMQ connection and
//! replaces it when it drops, so that publishers and consumers never handle
//! reconnection themselves.
//!
//! The task connects, declares the topology, opens a publishing channel in
//! confirm mode and publishes the result as [`Link::Up`] on a watch channel.
//! It then watches the connection; when it fails it publishes
//! [`Link::Connecting`] and reconnects with exponential backoff and jitter
//! (the `backon` crate), for ever, until the broker is shut down. Callers wait
//! on the watch channel for a live connection ([`Shared::live`]); consumer
//! streams re-subscribe on the new connection by themselves.
//!
//! lapin 4 has an automatic recovery mode of its own; it is not used because
//! the services must know when a recovery happened (change subscribers have to
//! drop their caches) and because server-named exclusive queues and the
//! delivery tags of a dead channel are easier to get right with a fresh
//! connection whose objects are all new.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, Event};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::RabbitConfig;
use super::topology::Topology;
use crate::BrokerError;

/// How often the manager double-checks the connection state, in case a
/// failure produced no event.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a graceful close may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One established connection, with its topology declared.
pub(crate) struct Live {
    /// Counts connections since start (1 for the first).
    pub(crate) generation: u64,
    conn: Connection,
    /// The confirm-mode channel shared by every publisher; re-opened on this
    /// connection if a channel-level error closed it.
    publisher: Mutex<Option<Channel>>,
}

impl Live {
    /// True while the connection is open.
    pub(crate) fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// The publishing channel (confirm mode), re-opened if it was closed.
    pub(crate) async fn publisher(&self) -> lapin::Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// A new channel on this connection.
    pub(crate) async fn channel(&self) -> lapin::Result<Channel> {
        self.conn.create_channel().await
    }
}

/// The state of the link to RabbitMQ, as published by the manager.
#[derive(Clone)]
pub(crate) enum Link {
    /// Not connected yet, or reconnecting; with the last error seen.
    Connecting { last_error: Option<Arc<str>> },
    /// Connected.
    Up(Arc<Live>),
    /// The first connection failed in a way retrying cannot fix (refused
    /// credentials, a topology that conflicts with existing queues).
    Failed(Arc<str>),
    /// Shut down.
    Closed,
}

/// What the manager, the broker handle and the streams share.
pub(crate) struct Shared {
    pub(crate) cfg: RabbitConfig,
    pub(crate) uri: AMQPUri,
    /// What the TLS of an `amqps://` URL trusts and presents.
    tls: lapin::tcp::OwnedTLSConfig,
    pub(crate) topology: Topology,
    link: watch::Sender<Link>,
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(
        cfg: RabbitConfig,
        uri: AMQPUri,
        tls: lapin::tcp::OwnedTLSConfig,
        topology: Topology,
    ) -> Self {
        let (link, _) = watch::channel(Link::Connecting { last_error: None });
        Self {
            cfg,
            uri,
            tls,
            topology,
            link,
            shutdown: CancellationToken::new(),
        }
    }

    /// The backoff schedule between connection or subscription attempts.
    pub(crate) fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.cfg.reconnect_min_backoff)
            .with_max_delay(self.cfg.reconnect_max_backoff)
            .with_jitter()
            .without_max_times()
    }

    /// The live connection right now, without waiting.
    pub(crate) fn current(&self) -> Result<Arc<Live>, BrokerError> {
        match &*self.link.borrow() {
            Link::Up(live) if live.is_connected() => Ok(live.clone()),
            Link::Closed => Err(BrokerError::Closed),
            other => Err(BrokerError::Unavailable {
                waited: Duration::ZERO,
                reason: describe(other),
            }),
        }
    }

    /// Waits for a live connection, for at most `max_wait` (for ever if
    /// `None`), or until shutdown.
    pub(crate) async fn live(&self, max_wait: Option<Duration>) -> Result<Arc<Live>, BrokerError> {
        let mut rx = self.link.subscribe();
        let wait = async {
            let settled = rx
                .wait_for(|link| match link {
                    Link::Up(live) => live.is_connected(),
                    Link::Connecting { .. } => false,
                    Link::Failed(_) | Link::Closed => true,
                })
                .await;
            match settled.as_deref() {
                Ok(Link::Up(live)) => Ok(live.clone()),
                Ok(Link::Failed(reason)) => Err(BrokerError::Refused(reason.to_string())),
                Ok(Link::Connecting { .. } | Link::Closed) | Err(_) => Err(BrokerError::Closed),
            }
        };
        let waited = async {
            match max_wait {
                None => wait.await,
                Some(limit) => match tokio::time::timeout(limit, wait).await {
                    Ok(result) => result,
                    Err(_) => Err(BrokerError::Unavailable {
                        waited: limit,
                        reason: describe(&self.link.borrow()),
                    }),
                },
            }
        };
        tokio::select! {
            () = self.shutdown.cancelled() => Err(BrokerError::Closed),
            result = waited => result,
        }
    }
}

fn describe(link: &Link) -> String {
    match link {
        Link::Connecting {
            last_error: Some(error),
        } => format!("not connected to RabbitMQ: {error}"),
        Link::Connecting { last_error: None } => "not connected to RabbitMQ yet".to_owned(),
        Link::Up(_) => "the connection to RabbitMQ was just lost".to_owned(),
        Link::Failed(reason) => reason.to_string(),
        Link::Closed => "the broker has been shut down".to_owned(),
    }
}

/// Why one connection attempt failed.
#[derive(Debug)]
struct ConnectError {
    message: String,
    /// Retrying cannot help (until an operator changes something).
    permanent: bool,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ConnectError {
    fn new(shared: &Shared, step: &str, error: &lapin::Error) -> Self {
        // 403 ACCESS_REFUSED, 406 PRECONDITION_FAILED (a queue exists with
        // other arguments), 530 NOT_ALLOWED (no such vhost, no permission).
        let code = match error.kind() {
            ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
            _ => None,
        };
        let authority = &shared.uri.authority;
        let at = format!("{}:{}", authority.host, authority.port);
        let tls = shared.uri.scheme == lapin::uri::AMQPScheme::AMQPS;
        if let Some(message) = crate::amqp_tls::handshake_failure(tls, &at, error) {
            // A plaintext port or an untrusted certificate: retrying will not help.
            return Self {
                message,
                permanent: true,
            };
        }
        let message = match code {
            Some(403) if step == "connect" => format!(
                "RabbitMQ refused the login for user {} on {at}: check amqp_url",
                authority.userinfo.username
            ),
            Some(530) if step == "connect" => format!(
                "RabbitMQ on {at} refused access to vhost {:?} for user {}: check amqp_url \
                 and the user's permissions",
                shared.uri.vhost, authority.userinfo.username
            ),
            _ => format!("{step}: {error}"),
        };
        Self {
            message,
            permanent: matches!(code, Some(403 | 406 | 530)),
        }
    }
}

/// Runs the manager until shutdown (or until the first connection fails
/// permanently).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut generation: u64 = 0;
    loop {
        generation += 1;
        let first = generation == 1;
        let attempt = (|| establish(&shared, generation))
            .retry(shared.backoff())
            .sleep(tokio::time::sleep)
            .when(|e: &ConnectError| !(first && e.permanent))
            .notify(|e: &ConnectError, delay: Duration| {
                warn!(error = %e, retry_in = ?delay, "cannot connect to RabbitMQ; retrying");
                shared.link.send_replace(Link::Connecting {
                    last_error: Some(e.message.as_str().into()),
                });
            });
        let live = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            result = attempt => match result {
                Ok(live) => live,
                Err(e) => {
                    // Only a first connection gives up; `RabbitBroker::connect` returns
                    // the reason to its caller, which reports it once.
                    debug!(error = %e, "cannot connect to RabbitMQ; giving up");
                    shared.link.send_replace(Link::Failed(e.message.as_str().into()));
                    return;
                }
            },
        };
        if first {
            info!(prefix = %shared.cfg.prefix, "connected to RabbitMQ, topology declared");
        } else {
            info!(prefix = %shared.cfg.prefix, generation, "reconnected to RabbitMQ, topology declared");
        }
        shared.link.send_replace(Link::Up(live.clone()));

        match watch_connection(&shared, &live).await {
            Some(reason) => {
                warn!(prefix = %shared.cfg.prefix, %reason, "lost the connection to RabbitMQ; reconnecting");
                shared.link.send_replace(Link::Connecting {
                    last_error: Some(reason.into()),
                });
            }
            None => {
                shared.link.send_replace(Link::Closed);
                if live.is_connected() {
                    let close = live.conn.close(200, "shutdown".into());
                    match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
                        Ok(Ok(())) => debug!("closed the RabbitMQ connection"),
                        Ok(Err(error)) => debug!(%error, "closing the RabbitMQ connection failed"),
                        Err(_) => warn!("closing the RabbitMQ connection timed out"),
                    }
                }
                return;
            }
        }
    }
    shared.link.send_replace(Link::Closed);
}

/// Connects, declares the topology and opens the publishing channel.
async fn establish(shared: &Shared, generation: u64) -> Result<Arc<Live>, ConnectError> {
    let cfg = &shared.cfg;
    let properties =
        ConnectionProperties::default().with_connection_name(cfg.connection_name.as_str().into());
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| ConnectError::new(shared, "connect", &e))?;
    let connect = Connection::connect_uri_with_config(
        shared.uri.clone(),
        properties,
        shared.tls.clone(),
        runtime,
    );
    let conn = match tokio::time::timeout(cfg.connect_timeout, connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => return Err(ConnectError::new(shared, "connect", &error)),
        Err(_) => {
            return Err(ConnectError {
                message: format!("connect: no answer within {:?}", cfg.connect_timeout),
                permanent: false,
            });
        }
    };
    let live = Live {
        generation,
        conn,
        publisher: Mutex::new(None),
    };
    match prepare(shared, &live).await {
        Ok(()) => Ok(Arc::new(live)),
        Err(e) => {
            if live.is_connected() {
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT,
                    live.conn.close(200, "setup failed".into()),
                )
                .await;
            }
            Err(e)
        }
    }
}

async fn prepare(shared: &Shared, live: &Live) -> Result<(), ConnectError> {
    let channel = live
        .channel()
        .await
        .map_err(|e| ConnectError::new(shared, "open a channel", &e))?;
    shared
        .topology
        .declare(&channel)
        .await
        .map_err(|e| ConnectError::new(shared, "declare the topology", &e))?;
    let _ = channel.close(200, "topology declared".into()).await;
    live.publisher()
        .await
        .map_err(|e| ConnectError::new(shared, "open the publishing channel", &e))?;
    Ok(())
}

/// Returns why the connection ended, or `None` at shutdown.
async fn watch_connection(shared: &Shared, live: &Live) -> Option<String> {
    let mut events = Box::pin(live.conn.events_listener());
    let mut check = tokio::time::interval(STATUS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return None,
            event = events.next() => match event {
                // Channel errors are reported here too; only a connection
                // that is no longer open matters.
                Some(Event::Error(error)) if !live.is_connected() => return Some(error.to_string()),
                Some(Event::Error(error)) => debug!(%error, "channel error on a healthy connection"),
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(%reason, "RabbitMQ blocked publishing on this connection (resource alarm)");
                }
                Some(Event::ConnectionUnblocked) => info!("RabbitMQ unblocked this connection"),
                Some(_) => {}
                None => return Some("the connection's event stream ended".to_owned()),
            },
            _ = check.tick() => {
                if !live.is_connected() {
                    return Some("the connection is no longer open".to_owned());
                }
            }
        }
    }
}
