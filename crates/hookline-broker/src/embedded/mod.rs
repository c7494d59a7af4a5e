//! The embedded adapter of the queue port: a durable queue kept in the SQLite
//! database of the one-process mode.
//!
//! `hookline serve` with no configuration runs every service in one process
//! with no external service at all. Work still has to survive a crash there:
//! a delivery acknowledged by ingest, or a retry handed to the retry service,
//! must not vanish because the process was killed. [`EmbeddedBroker`]
//! implements [`Broker`] on a table of the SQLite database that the storage
//! adapter already uses, so one file holds the whole state and a publish is
//! "confirmed" exactly when its transaction has committed.
//!
//! How it works:
//!
//! - **One writer task.** SQLite admits one writer at a time, so every write
//!   of the adapter (publish, claim, ack, requeue, dead-letter) is a command
//!   sent to a single task, which takes whatever commands are waiting and
//!   runs them in one `BEGIN IMMEDIATE` transaction (group commit). A caller's
//!   future resolves only after that transaction committed. Under load this
//!   turns thousands of small operations into a few large transactions; idle,
//!   a command runs alone at once.
//! - **Claims with a lease.** A consumer claims up to its free credit (its
//!   prefetch minus what it holds) with one `UPDATE … RETURNING` that hides the
//!   messages until now + visibility timeout, counts the delivery and stamps a
//!   lease token. Settling checks the token, so only the current holder can
//!   settle a message ([`BrokerError::StaleDelivery`] otherwise). While a
//!   message is held by a live consumer its lease is renewed, so a slow
//!   consumer is never raced by a redelivery of its own message; dropping a
//!   message unsettled puts it back at once.
//! - **Wake-ups.** A publish or requeue wakes the consumers of its queue
//!   through an in-process [`Notify`]; a fallback poll (a cheap read) catches
//!   messages whose visibility timeout ran out.
//! - **Poison messages.** A message claimed more than
//!   [`EmbeddedConfig::delivery_limit`] times goes to the `dead-letter` queue
//!   instead of being delivered again, like a RabbitMQ quorum queue's delivery
//!   limit; [`ReceivedMessage::dead_letter`](crate::ReceivedMessage::dead_letter)
//!   moves it there explicitly. Both record why in the headers
//!   `x-first-death-reason` / `x-last-death-reason` (`rejected`,
//!   `delivery_limit`) and `x-first-death-queue` / `x-last-death-queue`, the
//!   names RabbitMQ uses.
//! - **Changes** fan out in process through a [`broadcast`] channel: in one
//!   process nobody else can hold a cache, so nothing is persisted. A
//!   subscriber that falls behind gets [`ChangeNotice::Resync`].
//!
//! Durability: a published message is written to the database's write-ahead
//! log before `publish` returns, and a message leaves the queue only once its
//! `ack` committed. The adapter needs the database in WAL mode; with
//! `synchronous=NORMAL` a process crash or SIGKILL loses nothing acknowledged
//! (the WAL is written before commit returns; only power loss or an OS crash
//! can lose the last transactions), with `synchronous=FULL` power loss loses
//! nothing either, at the cost of an fsync per commit — which group commit
//! amortises. Whoever opens the pool chooses; see [`EmbeddedBroker`].
//!
//! Assumption: one database file is used by one process (that is what the
//! embedded mode is). [`EmbeddedBroker::open`] therefore makes every message
//! still hidden by a claim visible again at once, since the process that
//! claimed it is gone. A second process sharing the file would see its held
//! messages redelivered when the other one opens (delivered twice, never
//! lost). The visibility timeout remains as the safety net for a holder that
//! vanished without a trace.

mod consumer;
mod sql;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::consumer::Consumer;
use self::sql::{DEAD_LETTER_QUEUE, MAX_INSERT_LOG2, insert_sql, prepare_schema};
use self::writer::{Command, Writer, prepare};
use crate::{
    Broker, BrokerError, ChangeNotice, ChangeStream, MessageStream, OutgoingMessage, QueueName,
};

/// Settings of the embedded adapter. [`Default`] suits production.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// How long a claimed message stays hidden unless its holder renews the
    /// claim. Held messages are renewed every third of this, so it only
    /// matters for a holder that disappeared without a trace; a killed
    /// process is covered sooner, by [`EmbeddedBroker::open`].
    pub visibility_timeout: Duration,
    /// Deliveries of one message after which it is dead-lettered instead of
    /// delivered again (a poison message that keeps failing or crashing
    /// consumers). At least 1.
    pub delivery_limit: u32,
    /// How often an idle consumer checks for messages whose visibility
    /// timeout ran out (publishes and requeues wake it at once).
    pub poll_interval: Duration,
    /// Change announcements a slow subscriber may fall behind by before it
    /// gets [`ChangeNotice::Resync`]. At least 1.
    pub changes_capacity: usize,
    /// Shard queues per kind (`deliveries.<i>`, `retries.<i>`): 1 to
    /// [`crate::MAX_SHARDS`].
    pub delivery_shards: u16,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(300),
            delivery_limit: 20,
            poll_interval: Duration::from_millis(200),
            changes_capacity: 1024,
            delivery_shards: crate::shards::DEFAULT_SHARDS,
        }
    }
}

impl EmbeddedConfig {
    fn validate(&self) -> Result<(), BrokerError> {
        if self.visibility_timeout < Duration::from_millis(30)
            || self.visibility_timeout > Duration::from_secs(7 * 24 * 3600)
        {
            return Err(BrokerError::InvalidConfig(format!(
                "the visibility timeout must be between 30 ms and 7 days, got {:?}",
                self.visibility_timeout
            )));
        }
        if self.delivery_limit == 0 {
            return Err(BrokerError::InvalidConfig(
                "the delivery limit must be at least 1 (0 would dead-letter every message)"
                    .to_owned(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(BrokerError::InvalidConfig(
                "the poll interval must be longer than zero".to_owned(),
            ));
        }
        if self.delivery_shards == 0 || self.delivery_shards > crate::MAX_SHARDS {
            return Err(BrokerError::InvalidConfig(format!(
                "delivery_shards must be between 1 and {}, got {}",
                crate::MAX_SHARDS,
                self.delivery_shards
            )));
        }
        if self.changes_capacity == 0 {
            return Err(BrokerError::InvalidConfig(
                "the change announcement capacity must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn visibility_ms(&self) -> i64 {
        i64::try_from(self.visibility_timeout.as_millis()).unwrap_or(i64::MAX / 4)
    }
}

/// The embedded adapter: a durable queue in a SQLite database. Create it with
/// [`EmbeddedBroker::open`]; share it as `Arc<dyn Broker>`.
///
/// # The pool
///
/// The pool is the one the storage adapter uses (same file); the adapter adds
/// its own `broker_*` tables to it. Open it in WAL mode and with a busy
/// timeout, since the store and the adapter write to the same file:
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use hookline_broker::{EmbeddedBroker, EmbeddedConfig};
/// use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
///
/// let options = SqliteConnectOptions::new()
///     .filename("hookline.db")
///     .create_if_missing(true)
///     .journal_mode(SqliteJournalMode::Wal)
///     // NORMAL: a crash or SIGKILL loses nothing committed; FULL: power loss neither.
///     .synchronous(SqliteSynchronous::Normal)
///     .busy_timeout(Duration::from_secs(5));
/// let pool = SqlitePool::connect_with(options).await?;
/// let broker = EmbeddedBroker::open(pool, EmbeddedConfig::default()).await?;
/// # broker.close().await;
/// # Ok(())
/// # }
/// ```
///
/// `synchronous=NORMAL` is enough for the guarantee the services rely on: a
/// process crash or SIGKILL loses no published message, no acknowledged
/// settlement and no scheduled retry. Only `FULL` also survives power loss
/// and OS crashes.
///
/// # Shutdown
///
/// [`close`](Self::close) ends every stream, finishes the commands already
/// sent, puts every unsettled message back on its queue and waits for that.
/// Dropping the broker does the same in the background. Neither closes the
/// pool, which belongs to the caller. After either, settling a message
/// received earlier fails with [`BrokerError::Closed`]; it is redelivered.
pub struct EmbeddedBroker {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("config", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

/// What the broker handle, its streams and its ackers share.
pub(super) struct Shared {
    pool: SqlitePool,
    cfg: EmbeddedConfig,
    commands: mpsc::UnboundedSender<Command>,
    /// Woken when messages become visible in a queue (index: [`slot`]).
    ready: Arc<[Notify]>,
    changes: broadcast::Sender<Vec<u8>>,
    shutdown: CancellationToken,
}

impl Shared {
    /// Sends a command to the writer and waits for its answer.
    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, BrokerError>>) -> Command,
    ) -> Result<T, BrokerError> {
        if self.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| BrokerError::Closed)?;
        answer.await.unwrap_or(Err(BrokerError::Closed))
    }

    /// True if the queue has a message that may be claimed now (a read).
    async fn has_visible(&self, queue: QueueName) -> Result<bool, BrokerError> {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM broker_messages WHERE queue = ?1 AND visible_at <= ?2)",
        )
        .bind(queue.name())
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| BrokerError::backend(format!("look for ready messages in {queue}"), e))
    }

    /// The highest shard index (of either kind) above the configured count that still
    /// holds a message, if any.
    async fn highest_shard_in_use(&self) -> Result<Option<u16>, BrokerError> {
        for shard in (self.cfg.delivery_shards..crate::MAX_SHARDS).rev() {
            for kind in crate::QueueKind::ALL {
                if self
                    .count_any(&QueueName::Shard(kind, shard).name())
                    .await?
                {
                    return Ok(Some(shard));
                }
            }
        }
        Ok(None)
    }

    async fn count_any(&self, queue: &str) -> Result<bool, BrokerError> {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM broker_messages WHERE queue = ?1)",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| BrokerError::backend(format!("look for messages in {queue}"), e))
    }

    async fn count(&self, queue: &str, visible_only: bool) -> Result<u64, BrokerError> {
        let visible_until = if visible_only { now_ms() } else { i64::MAX };
        let count = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM broker_messages WHERE queue = ?1 AND visible_at <= ?2",
        )
        .bind(queue)
        .bind(visible_until)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| BrokerError::backend(format!("count the messages of queue {queue}"), e))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

impl EmbeddedBroker {
    /// Opens the queue in the database of `pool`: creates its tables if
    /// needed (idempotent, in one transaction), makes every message still
    /// held by a claim visible again (their holder was a process that is
    /// gone: see the module documentation) and starts the writer task, which
    /// needs a tokio runtime.
    ///
    /// Fails on an invalid configuration, a database written by a newer
    /// version of this adapter, or a database error.
    pub async fn open(pool: SqlitePool, cfg: EmbeddedConfig) -> Result<Self, BrokerError> {
        cfg.validate()?;
        let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .map_err(|e| BrokerError::backend("read the journal mode of the database", e))?;
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&pool)
            .await
            .map_err(|e| BrokerError::backend("read the synchronous mode of the database", e))?;
        match journal_mode.to_ascii_lowercase().as_str() {
            "wal" => {}
            "memory" | "off" => warn!(
                %journal_mode,
                "the embedded queue's database has no durable journal: a crash can lose or corrupt queued messages; open it with journal_mode=WAL"
            ),
            _ => warn!(
                %journal_mode,
                "the embedded queue's database is not in WAL mode: readers and the writer block each other; open it with journal_mode=WAL"
            ),
        }

        let now = now_ms();
        let (released, newest_lease) = prepare_schema(&pool, now).await?;
        info!(
            %journal_mode,
            synchronous = synchronous_name(synchronous),
            released,
            "embedded queue open"
        );

        let (commands, receiver) = mpsc::unbounded_channel();
        let ready: Arc<[Notify]> = (0..SLOTS).map(|_| Notify::new()).collect();
        let (changes, _) = broadcast::channel(cfg.changes_capacity);
        let shared = Arc::new(Shared {
            pool: pool.clone(),
            cfg: cfg.clone(),
            commands,
            ready: ready.clone(),
            changes,
            shutdown: CancellationToken::new(),
        });
        // A lease token must never equal one that a stale holder may still
        // present: start past the clock (in nanoseconds, so past any earlier
        // run of this process) and past every claim released above.
        let clock_seed = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        )
        .unwrap_or(i64::MAX / 2);
        let writer = Writer {
            pool,
            visibility_ms: cfg.visibility_ms(),
            delivery_limit: i64::from(cfg.delivery_limit),
            renew_every: (cfg.visibility_timeout / 3).max(Duration::from_millis(10)),
            receiver,
            ready,
            shutdown: shared.shutdown.clone(),
            held: HashMap::new(),
            pending_releases: Vec::new(),
            next_lease: clock_seed.max(newest_lease.saturating_add(1)),
            insert_sql: (0..=MAX_INSERT_LOG2).map(insert_sql).collect(),
        };
        let writer = tokio::spawn(writer.run());
        Ok(Self {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EmbeddedConfig {
        &self.shared.cfg
    }

    /// Number of messages in the dead-letter queue (for metrics and alerts).
    pub async fn dead_letter_depth(&self) -> Result<u64, BrokerError> {
        self.shared.count(DEAD_LETTER_QUEUE, false).await
    }

    /// Shuts down: ends every stream, finishes the commands already sent,
    /// puts every unsettled message back on its queue, and returns when that
    /// is done. The pool stays open.
    pub async fn close(&self) {
        self.shared.shutdown.cancel();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn publish(
        &self,
        queue: QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let prepared = messages
            .into_iter()
            .enumerate()
            .map(|(index, message)| prepare(index, message))
            .collect::<Result<Vec<_>, _>>()?;
        self.shared
            .request(|reply| Command::Publish {
                queue,
                messages: prepared,
                reply,
            })
            .await
    }

    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<MessageStream, BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        let consumer = Consumer::new(self.shared.clone(), queue, prefetch);
        let stream = futures::stream::unfold(consumer, |mut consumer| async move {
            let message = consumer.next().await?;
            Some((message, consumer))
        });
        Ok(MessageStream::new(stream))
    }

    async fn announce(&self, change: Vec<u8>) -> Result<(), BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        // An error only means nobody subscribes, which is fine.
        let _ = self.shared.changes.send(change);
        Ok(())
    }

    async fn changes(&self) -> Result<ChangeStream, BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        let receiver = self.shared.changes.subscribe();
        let shutdown = self.shared.shutdown.clone();
        let stream = futures::stream::unfold(
            (receiver, shutdown),
            |(mut receiver, shutdown)| async move {
                let notice = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return None,
                    received = receiver.recv() => match received {
                        Ok(change) => ChangeNotice::Change(change),
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            warn!(missed, "change subscriber fell behind; it must resync");
                            ChangeNotice::Resync
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                };
                Some((notice, (receiver, shutdown)))
            },
        );
        Ok(ChangeStream::new(stream))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        sqlx::query("SELECT 1")
            .execute(&self.shared.pool)
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::backend("reach the embedded queue's database", e))
    }

    async fn queue_depth(&self, queue: QueueName) -> Result<u64, BrokerError> {
        self.shared.count(&queue.name(), true).await
    }

    fn delivery_shards(&self) -> u16 {
        self.shared.cfg.delivery_shards
    }

    async fn consumed_shards(&self) -> Result<u16, BrokerError> {
        // Shards past the setting matter only while they hold messages.
        let highest = self.shared.highest_shard_in_use().await?;
        Ok(self
            .shared
            .cfg
            .delivery_shards
            .max(highest.map_or(0, |h| h + 1)))
    }

    async fn oldest_published_ms(&self, queue: QueueName) -> Result<Option<i64>, BrokerError> {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT min(published_at) FROM broker_messages WHERE queue = ?1",
        )
        .bind(queue.name())
        .fetch_one(&self.shared.pool)
        .await
        .map_err(|e| BrokerError::backend(format!("read the oldest message of {queue}"), e))
    }

    async fn dead_letter_depth(&self) -> Result<u64, BrokerError> {
        // The inherent method of the same name.
        EmbeddedBroker::dead_letter_depth(self).await
    }
}

fn synchronous_name(level: i64) -> &'static str {
    match level {
        0 => "OFF",
        1 => "NORMAL",
        2 => "FULL",
        3 => "EXTRA",
        _ => "unknown",
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Number of wake-ups in [`Shared::ready`]: the unsharded queues and every possible
/// shard of both kinds.
const SLOTS: usize = 2 + 2 * crate::MAX_SHARDS as usize;

/// Index of a queue's wake-up in [`Shared::ready`].
fn slot(queue: QueueName) -> usize {
    let shards = usize::from(crate::MAX_SHARDS);
    match queue {
        QueueName::Deliveries => 0,
        QueueName::Retries => 1,
        QueueName::Shard(crate::QueueKind::Deliveries, i) => 2 + usize::from(i).min(shards - 1),
        QueueName::Shard(crate::QueueKind::Retries, i) => {
            2 + shards + usize::from(i).min(shards - 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_are_refused() {
        assert!(EmbeddedConfig::default().validate().is_ok());
        for cfg in [
            EmbeddedConfig {
                delivery_limit: 0,
                ..EmbeddedConfig::default()
            },
            EmbeddedConfig {
                changes_capacity: 0,
                ..EmbeddedConfig::default()
            },
            EmbeddedConfig {
                poll_interval: Duration::ZERO,
                ..EmbeddedConfig::default()
            },
            EmbeddedConfig {
                visibility_timeout: Duration::ZERO,
                ..EmbeddedConfig::default()
            },
        ] {
            let error = cfg.validate().unwrap_err();
            assert!(matches!(error, BrokerError::InvalidConfig(_)), "{error}");
        }
    }
}
