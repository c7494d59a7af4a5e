//! The typed registry change stream: [`announce`] on one side; on the other one broker
//! subscription per process ([`RegistryChanges::follow`]), decoded once and fanned out
//! to every cache through a broadcast channel.

use futures::{Stream, StreamExt};
use hookline_broker::{Broker, BrokerError, ChangeNotice};
use hookline_core::model::RegistryChange;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How many notices a slow follower may fall behind before it is told to `Resync`.
const FAN_OUT_CAPACITY: usize = 1024;

/// What a follower of the registry hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryNotice {
    /// One committed change: drop what it makes stale.
    Change(RegistryChange),
    /// Changes may have been missed: drop everything cached.
    Resync,
}

/// Tells every process about a committed change; returns once the broker confirmed it.
/// A failure never undoes the change: caches expire on their own.
pub async fn announce(broker: &dyn Broker, change: &RegistryChange) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(change).map_err(|e| BrokerError::InvalidMessage {
        index: 0,
        reason: format!("the change does not encode: {e}"),
    })?;
    broker.announce(body).await
}

/// The change stream of one process; clone it to hand it around.
#[derive(Clone)]
pub struct RegistryChanges {
    fan_out: broadcast::Sender<RegistryNotice>,
}

impl RegistryChanges {
    /// Subscribes to the broker's changes (established when this returns, so every
    /// change announced afterwards is heard) and fans them out until `shutdown` or the
    /// broker's end. If the broker cannot be followed, that is logged and the caches
    /// rely on their TTL alone.
    pub async fn follow(broker: &dyn Broker, shutdown: CancellationToken) -> Self {
        let (fan_out, _) = broadcast::channel(FAN_OUT_CAPACITY);
        let this = Self { fan_out };
        match broker.changes().await {
            Ok(changes) => {
                let fan_out = this.fan_out.clone();
                tokio::spawn(async move {
                    let mut changes = changes.map(decode);
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            notice = changes.next() => match notice {
                                // No follower yet is not an error: nothing is cached.
                                Some(notice) => { let _ = fan_out.send(notice); }
                                None => return,
                            },
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot follow registry changes; caches expire on their own"
            ),
        }
        this
    }

    /// A stream with nothing behind it, for a component run on its own (tests, tools):
    /// its caches rely on their TTL, and on [`Self::send`].
    pub fn detached() -> Self {
        let (fan_out, _) = broadcast::channel(FAN_OUT_CAPACITY);
        Self { fan_out }
    }

    /// Hands `notice` to every follower of this process (a change made here that other
    /// caches of the same process must see at once, before the broker echoes it).
    pub fn send(&self, notice: RegistryNotice) {
        let _ = self.fan_out.send(notice);
    }

    /// Every notice from now on; one that falls more than a thousand behind hears
    /// `Resync` instead of what it missed.
    pub fn subscribe(&self) -> RegistryStream {
        let rx = self.fan_out.subscribe();
        RegistryStream(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            let notice = match rx.recv().await {
                Ok(notice) => notice,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "a cache fell behind the registry changes; dropping it"
                    );
                    RegistryNotice::Resync
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((notice, rx))
        })))
    }

    /// Runs `apply` on every notice until `shutdown`: the one follow loop every cache
    /// uses.
    pub fn spawn_follower<F, Fut>(
        &self,
        shutdown: CancellationToken,
        mut apply: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(RegistryNotice) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut notices = self.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    notice = notices.next() => match notice {
                        Some(notice) => apply(notice).await,
                        None => return,
                    },
                }
            }
        })
    }
}

/// The typed stream of one follower.
pub struct RegistryStream(std::pin::Pin<Box<dyn Stream<Item = RegistryNotice> + Send>>);

impl Stream for RegistryStream {
    type Item = RegistryNotice;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<RegistryNotice>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// A broker notice as a typed one; an unreadable announcement is a `Resync`.
fn decode(notice: ChangeNotice) -> RegistryNotice {
    match notice {
        ChangeNotice::Resync => RegistryNotice::Resync,
        ChangeNotice::Change(body) => match serde_json::from_slice(&body) {
            Ok(change) => RegistryNotice::Change(change),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable registry change; dropping every cache");
                RegistryNotice::Resync
            }
        },
    }
}
