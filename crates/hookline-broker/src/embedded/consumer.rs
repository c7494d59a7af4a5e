//! A consumer stream of the embedded queue and the acker of each message it hands
//! out: claims through the writer, waits for wake-ups, returns credit on settlement.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::futures::Notified;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::warn;

use super::writer::{ClaimedRow, Command, Lease};
use super::{Shared, slot};
use crate::{Acker, BrokerError, QueueName, ReceivedMessage, Settlement};

/// Longest pause of a consumer between failed claims.
pub(super) const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(5);

/// One consumer stream: claims up to its free credit whenever its buffer is
/// empty, waits for a wake-up when nothing is ready.
pub(super) struct Consumer {
    shared: Arc<Shared>,
    queue: QueueName,
    /// One permit per message this consumer may hold unsettled (buffered or
    /// handed out); a message gives its permit back when it is settled or
    /// dropped.
    credit: Arc<Semaphore>,
    buffer: VecDeque<ReceivedMessage>,
    /// Pause after a failed claim, doubled up to [`MAX_CLAIM_BACKOFF`].
    backoff: Duration,
}

impl Consumer {
    pub(super) fn new(shared: Arc<Shared>, queue: QueueName, prefetch: u16) -> Self {
        Self {
            backoff: shared.cfg.poll_interval,
            shared,
            queue,
            credit: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
            buffer: VecDeque::new(),
        }
    }

    /// The next message; `None` once the broker is shut down.
    pub(super) async fn next(&mut self) -> Option<ReceivedMessage> {
        let shared = self.shared.clone();
        loop {
            if shared.shutdown.is_cancelled() {
                return None;
            }
            if let Some(message) = self.buffer.pop_front() {
                return Some(message);
            }
            let mut permits = tokio::select! {
                () = shared.shutdown.cancelled() => return None,
                permit = self.credit.clone().acquire_owned() => permit.ok()?,
            };
            let more = self.credit.available_permits();
            if more > 0
                && let Ok(extra) = self
                    .credit
                    .clone()
                    .try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
            {
                permits.merge(extra);
            }

            // Registered before the claim, so that a publish committed after
            // the claim looked is not missed.
            let mut notified = std::pin::pin!(shared.ready[slot(self.queue)].notified());
            notified.as_mut().enable();

            let max = permits.num_permits();
            let queue = self.queue;
            match shared
                .request(|reply| Command::Claim { queue, max, reply })
                .await
            {
                Ok(claimed) if !claimed.rows.is_empty() => {
                    self.backoff = shared.cfg.poll_interval;
                    for row in claimed.rows {
                        let permit = permits.split(1);
                        let message = self.received(row, permit);
                        self.buffer.push_back(message);
                    }
                }
                // Everything found was over the delivery limit: look again.
                Ok(claimed) if claimed.dead_lettered > 0 => {}
                Ok(_) => {
                    drop(permits);
                    self.backoff = shared.cfg.poll_interval;
                    if !self.wait_for_work(&shared, notified).await {
                        return None;
                    }
                }
                Err(BrokerError::Closed) => return None,
                Err(error) => {
                    drop(permits);
                    warn!(queue = %self.queue, %error, retry_in = ?self.backoff, "cannot claim messages; retrying");
                    tokio::select! {
                        () = shared.shutdown.cancelled() => return None,
                        () = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_CLAIM_BACKOFF);
                }
            }
        }
    }

    /// Waits until a message may be ready: a wake-up, or a poll that finds
    /// one. False at shutdown.
    async fn wait_for_work(&self, shared: &Shared, mut notified: Pin<&mut Notified<'_>>) -> bool {
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => return false,
                () = notified.as_mut() => return true,
                () = tokio::time::sleep(shared.cfg.poll_interval) => {
                    // An error is reported by the claim that follows.
                    if shared.has_visible(self.queue).await.unwrap_or(true) {
                        return true;
                    }
                }
            }
        }
    }

    fn received(&self, row: ClaimedRow, permit: Option<OwnedSemaphorePermit>) -> ReceivedMessage {
        let mut headers: BTreeMap<String, String> = match serde_json::from_str(&row.headers) {
            Ok(headers) => headers,
            Err(error) => {
                warn!(queue = %self.queue, id = row.lease.id, %error, "message headers are not a JSON object of strings; delivering it without them");
                BTreeMap::new()
            }
        };
        let redelivered = row.delivery_count > 1;
        if redelivered {
            // As RabbitMQ quorum queues do: earlier deliveries of the message.
            headers.insert(
                "x-delivery-count".to_owned(),
                (row.delivery_count - 1).to_string(),
            );
        }
        ReceivedMessage::new(
            row.body,
            headers,
            redelivered,
            Box::new(EmbeddedAcker {
                lease: row.lease,
                commands: self.shared.commands.clone(),
                _permit: permit,
                settled: false,
            }),
        )
    }
}

/// Settles one message through the writer. Dropped unsettled, it puts the
/// message back on its queue at once.
pub(super) struct EmbeddedAcker {
    lease: Lease,
    commands: mpsc::UnboundedSender<Command>,
    /// The consumer's credit for this message, returned when the acker is
    /// dropped: after the settlement committed, or at once if unsettled.
    _permit: Option<OwnedSemaphorePermit>,
    settled: bool,
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), BrokerError> {
        self.settled = true;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Settle {
                lease: self.lease,
                settlement,
                reply: Some(reply),
            })
            .map_err(|_| BrokerError::Closed)?;
        answer.await.unwrap_or(Err(BrokerError::Closed))
    }
}

impl Drop for EmbeddedAcker {
    fn drop(&mut self) {
        if !self.settled {
            // If the writer is gone, the next open() releases the message.
            let _ = self.commands.send(Command::Settle {
                lease: self.lease,
                settlement: Settlement::Requeue,
                reply: None,
            });
        }
    }
}
