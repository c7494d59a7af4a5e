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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, trace, warn};

use crate::{
    Acker, Broker, BrokerError, ChangeNotice, ChangeStream, MessageStream, OutgoingMessage,
    QueueName, ReceivedMessage, Settlement,
};

/// The schema, run idempotently at every [`EmbeddedBroker::open`].
const SCHEMA: &str = include_str!("../sql/embedded_schema.sql");

/// The schema version this code writes and understands.
const SCHEMA_VERSION: i64 = 1;

/// Queue name of dead-lettered messages in `broker_messages.queue`.
const DEAD_LETTER_QUEUE: &str = "dead-letter";

/// Most commands one writer transaction takes.
const MAX_COMMANDS_PER_TRANSACTION: usize = 1024;

/// Largest multi-row INSERT: 2^8 = 256 rows (5 parameters each, well under
/// SQLite's 32766). Smaller remainders are split in powers of two so that
/// only nine statement shapes exist and all stay in the statement cache.
const MAX_INSERT_LOG2: usize = 8;

/// SQLite's default limit on the size of one value (`SQLITE_MAX_LENGTH`).
const MAX_VALUE_LEN: usize = 1_000_000_000;

/// Delay before the writer retries putting back messages whose settlement
/// failed.
const RELEASE_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Longest pause of a consumer between failed claims.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(5);

/// Claims up to `?5` visible messages of queue `?3` (now `?4`): hides them
/// until `?1`, counts the delivery, stamps lease `?2`.
const CLAIM_SQL: &str = "\
UPDATE broker_messages
   SET visible_at = ?1, delivery_count = delivery_count + 1, lease = ?2
 WHERE id IN (SELECT id FROM broker_messages
               WHERE queue = ?3 AND visible_at <= ?4
               ORDER BY visible_at, id
               LIMIT ?5)
RETURNING id, body, headers, delivery_count";

/// Deletes the messages of the `[[id, lease], …]` JSON array `?1` that are
/// still held under that lease.
const ACK_SQL: &str = "\
DELETE FROM broker_messages
 WHERE id IN (SELECT value ->> 0 FROM json_each(?1))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))
RETURNING id, lease";

/// Makes the held messages of `?2` visible again at `?1`.
const REQUEUE_SQL: &str = "\
UPDATE broker_messages
   SET visible_at = ?1
 WHERE id IN (SELECT value ->> 0 FROM json_each(?2))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))
   AND queue <> 'dead-letter'
RETURNING id, lease";

/// Pushes the visibility of the held messages of `?2` out to `?1`.
const RENEW_SQL: &str = "\
UPDATE broker_messages
   SET visible_at = ?1
 WHERE id IN (SELECT value ->> 0 FROM json_each(?2))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))
   AND queue <> 'dead-letter'";

/// Moves the held messages of `?3` to the dead-letter queue (visible at
/// `?1`), recording reason `?2` and the queue they came from.
const DEAD_LETTER_SQL: &str = "\
UPDATE broker_messages
   SET queue = 'dead-letter',
       visible_at = ?1,
       headers = json_set(
           json_insert(
               CASE WHEN json_valid(headers) THEN headers ELSE '{}' END,
               '$.\"x-first-death-reason\"', ?2,
               '$.\"x-first-death-queue\"', queue),
           '$.\"x-last-death-reason\"', ?2,
           '$.\"x-last-death-queue\"', queue)
 WHERE id IN (SELECT value ->> 0 FROM json_each(?3))
   AND (id, lease) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?3))
   AND queue <> 'dead-letter'
RETURNING id, lease";

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
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(300),
            delivery_limit: 20,
            poll_interval: Duration::from_millis(200),
            changes_capacity: 1024,
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
struct Shared {
    pool: SqlitePool,
    cfg: EmbeddedConfig,
    commands: mpsc::UnboundedSender<Command>,
    /// Woken when messages become visible in a queue (index: [`slot`]).
    ready: Arc<[Notify; 2]>,
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
        .bind(queue.as_str())
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| BrokerError::backend(format!("look for ready messages in {queue}"), e))
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
        let ready = Arc::new([Notify::new(), Notify::new()]);
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
        let consumer = Consumer {
            shared: self.shared.clone(),
            queue,
            credit: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
            buffer: VecDeque::new(),
            backoff: self.shared.cfg.poll_interval,
        };
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
        self.shared.count(queue.as_str(), true).await
    }

    async fn dead_letter_depth(&self) -> Result<u64, BrokerError> {
        // The inherent method of the same name.
        EmbeddedBroker::dead_letter_depth(self).await
    }
}

/// Creates the tables, checks the version and releases every held message,
/// in one transaction. Returns how many were released and the newest lease
/// token stored.
async fn prepare_schema(pool: &SqlitePool, now: i64) -> Result<(u64, i64), BrokerError> {
    let context = "create the embedded queue's tables";
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| BrokerError::backend(context, e))?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut *tx)
        .await
        .map_err(|e| BrokerError::backend(context, e))?;
    let version: i64 =
        sqlx::query_scalar("SELECT value FROM broker_meta WHERE key = 'schema_version'")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| BrokerError::backend("read the embedded queue's schema version", e))?;
    if version > SCHEMA_VERSION {
        return Err(BrokerError::InvalidConfig(format!(
            "the database's queue tables have schema version {version}, written by a newer Hookline; this one understands up to {SCHEMA_VERSION}"
        )));
    }
    let leases: Vec<i64> = sqlx::query_scalar(
        "UPDATE broker_messages SET visible_at = ?1
          WHERE queue IN ('deliveries', 'retries') AND visible_at > ?1
         RETURNING lease",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| BrokerError::backend("release the messages held before the restart", e))?;
    tx.commit()
        .await
        .map_err(|e| BrokerError::backend(context, e))?;
    let released = u64::try_from(leases.len()).unwrap_or(u64::MAX);
    Ok((released, leases.into_iter().max().unwrap_or(0)))
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

/// Index of a queue's wake-up in [`Shared::ready`].
fn slot(queue: QueueName) -> usize {
    match queue {
        QueueName::Deliveries => 0,
        QueueName::Retries => 1,
    }
}

/// The multi-row INSERT of `2^log2` messages.
fn insert_sql(log2: usize) -> Arc<str> {
    let rows = vec!["(?, ?, ?, ?, ?)"; 1 << log2].join(", ");
    format!(
        "INSERT INTO broker_messages (queue, body, headers, visible_at, published_at) VALUES {rows}"
    )
    .into()
}

/// A `[[id, lease], …]` JSON array, the parameter of the settling statements.
fn leases_json(leases: impl IntoIterator<Item = (i64, i64)>) -> String {
    let mut json = String::from("[");
    for (i, (id, lease)) in leases.into_iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(json, "[{id},{lease}]");
    }
    json.push(']');
    json
}

/// A message ready to insert.
struct Prepared {
    body: Vec<u8>,
    headers: String,
}

fn prepare(index: usize, message: OutgoingMessage) -> Result<Prepared, BrokerError> {
    if message.body.len() > MAX_VALUE_LEN {
        return Err(BrokerError::InvalidMessage {
            index,
            reason: format!(
                "the body is {} bytes; the embedded queue stores at most {MAX_VALUE_LEN}",
                message.body.len()
            ),
        });
    }
    let headers =
        serde_json::to_string(&message.headers).map_err(|e| BrokerError::InvalidMessage {
            index,
            reason: format!("the headers cannot be encoded: {e}"),
        })?;
    if headers.len() > MAX_VALUE_LEN {
        return Err(BrokerError::InvalidMessage {
            index,
            reason: format!(
                "the headers take {} bytes; the embedded queue stores at most {MAX_VALUE_LEN}",
                headers.len()
            ),
        });
    }
    Ok(Prepared {
        body: message.body,
        headers,
    })
}

/// One claim of one message: only the holder of this lease may settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Lease {
    id: i64,
    token: i64,
    queue: QueueName,
}

type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

/// What the writer task is asked to do.
enum Command {
    Publish {
        queue: QueueName,
        messages: Vec<Prepared>,
        reply: Reply<()>,
    },
    Claim {
        queue: QueueName,
        max: usize,
        reply: Reply<Claimed>,
    },
    /// `reply: None` is a message dropped unsettled: put it back, nobody
    /// waits.
    Settle {
        lease: Lease,
        settlement: Settlement,
        reply: Option<Reply<()>>,
    },
}

/// A message handed to a consumer.
struct ClaimedRow {
    lease: Lease,
    body: Vec<u8>,
    headers: String,
    delivery_count: i64,
}

/// The result of one claim.
#[derive(Default)]
struct Claimed {
    rows: Vec<ClaimedRow>,
    /// Messages that were over the delivery limit and went to the
    /// dead-letter queue instead.
    dead_lettered: usize,
}

/// The task that performs every write of the adapter (see the module
/// documentation).
struct Writer {
    pool: SqlitePool,
    visibility_ms: i64,
    delivery_limit: i64,
    renew_every: Duration,
    receiver: mpsc::UnboundedReceiver<Command>,
    ready: Arc<[Notify; 2]>,
    shutdown: CancellationToken,
    /// Messages handed out and not settled yet: id → lease token.
    held: HashMap<i64, i64>,
    /// Messages to put back whose first attempt failed.
    pending_releases: Vec<Lease>,
    next_lease: i64,
    /// `insert_sql[k]` inserts `2^k` rows.
    insert_sql: Vec<Arc<str>>,
}

/// What one transaction of the writer changed.
#[derive(Default)]
struct Outcome {
    /// `(id, lease)` of every message settled as asked.
    settled: HashSet<(i64, i64)>,
    /// One result per claim, in order.
    claimed: Vec<Claimed>,
}

impl Writer {
    async fn run(mut self) {
        let mut renew = tokio::time::interval(self.renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.reset();
        loop {
            let mut batch = Vec::new();
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                _ = renew.tick() => {
                    self.renew().await;
                    if self.pending_releases.is_empty() {
                        continue;
                    }
                }
                () = tokio::time::sleep(RELEASE_RETRY_DELAY), if !self.pending_releases.is_empty() => {}
                command = self.receiver.recv() => match command {
                    Some(command) => batch.push(command),
                    None => break,
                },
            }
            while batch.len() < MAX_COMMANDS_PER_TRANSACTION {
                match self.receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.run_batch(batch, false).await;
        }
        self.shut_down().await;
    }

    /// Finishes what was sent, then puts every held message back.
    async fn shut_down(&mut self) {
        let mut batch = Vec::new();
        while let Ok(command) = self.receiver.try_recv() {
            batch.push(command);
        }
        self.run_batch(batch, true).await;
        self.receiver.close();
        let mut leases: Vec<(i64, i64)> = std::mem::take(&mut self.held).into_iter().collect();
        leases.extend(self.pending_releases.drain(..).map(|l| (l.id, l.token)));
        if leases.is_empty() {
            return;
        }
        let result = sqlx::query(REQUEUE_SQL)
            .bind(now_ms())
            .bind(leases_json(leases.iter().copied()))
            .execute(&self.pool)
            .await;
        match result {
            Ok(done) => info!(
                released = done.rows_affected(),
                "embedded queue closed; unsettled messages are back on their queues"
            ),
            Err(error) => warn!(
                %error,
                unsettled = leases.len(),
                "embedded queue closed without putting unsettled messages back; they are redelivered at the next start"
            ),
        }
    }

    /// Renews the claim of every held message.
    async fn renew(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let result = sqlx::query(RENEW_SQL)
            .bind(now_ms().saturating_add(self.visibility_ms))
            .bind(leases_json(
                self.held.iter().map(|(id, token)| (*id, *token)),
            ))
            .execute(&self.pool)
            .await;
        if let Err(error) = result {
            warn!(%error, held = self.held.len(), "cannot renew the claims of held messages; they may be redelivered when their visibility timeout ends");
        }
    }

    /// Runs a batch of commands in one transaction and answers them. While
    /// `closing`, claims are refused.
    async fn run_batch(&mut self, batch: Vec<Command>, closing: bool) {
        let mut rows = Vec::new();
        let mut published = Vec::new();
        let mut settles = Vec::new();
        let mut claims = Vec::new();
        for command in batch {
            match command {
                Command::Publish {
                    queue,
                    messages,
                    reply,
                } => {
                    rows.extend(messages.into_iter().map(|m| (queue, m)));
                    published.push((queue, reply));
                }
                Command::Settle {
                    lease,
                    settlement,
                    reply,
                } => settles.push((lease, settlement, reply)),
                Command::Claim { reply, .. } if closing => {
                    let _ = reply.send(Err(BrokerError::Closed));
                }
                Command::Claim { queue, max, reply } => claims.push((queue, max, reply)),
            }
        }
        let releases = std::mem::take(&mut self.pending_releases);
        if rows.is_empty() && settles.is_empty() && claims.is_empty() && releases.is_empty() {
            return;
        }
        let row_count = rows.len();
        let settle_requests: Vec<(Lease, Settlement)> =
            settles.iter().map(|(l, s, _)| (*l, *s)).collect();
        let claim_requests: Vec<(QueueName, usize)> =
            claims.iter().map(|(q, max, _)| (*q, *max)).collect();

        let now = now_ms();
        let result = self
            .execute(now, rows, &settle_requests, &releases, &claim_requests)
            .await;
        trace!(
            published = row_count,
            settled = settles.len(),
            claims = claims.len(),
            ok = result.is_ok(),
            "embedded queue transaction"
        );

        let mut woken = [false; 2];
        match result {
            Ok(outcome) => {
                for (queue, reply) in published {
                    woken[slot(queue)] = true;
                    let _ = reply.send(Ok(()));
                }
                for (lease, settlement, reply) in settles {
                    self.forget(lease);
                    let done = outcome.settled.contains(&(lease.id, lease.token));
                    if done && settlement == Settlement::Requeue {
                        woken[slot(lease.queue)] = true;
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(if done {
                            Ok(())
                        } else {
                            Err(BrokerError::StaleDelivery)
                        });
                    }
                }
                for lease in releases {
                    self.forget(lease);
                    woken[slot(lease.queue)] = true;
                }
                for ((_, _, reply), claimed) in claims.into_iter().zip(outcome.claimed) {
                    for row in &claimed.rows {
                        self.held.insert(row.lease.id, row.lease.token);
                    }
                    if let Err(Ok(claimed)) = reply.send(Ok(claimed)) {
                        // The consumer gave up waiting: put its messages back.
                        for row in claimed.rows {
                            self.forget(row.lease);
                            self.pending_releases.push(row.lease);
                        }
                    }
                }
            }
            Err(error) => {
                let error = error.to_string();
                let failure = |what: &str| {
                    BrokerError::backend(
                        format!("{what} in the embedded queue"),
                        format!("the transaction failed: {error}"),
                    )
                };
                warn!(%error, published = row_count, settled = settle_requests.len(), claims = claim_requests.len(), "embedded queue transaction failed");
                for (_, reply) in published {
                    let _ = reply.send(Err(failure("store published messages")));
                }
                for (lease, _, reply) in settles {
                    // Whatever was asked, the message must come back soon:
                    // the caller learns that it will be redelivered.
                    self.forget(lease);
                    self.pending_releases.push(lease);
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(failure("settle a message")));
                    }
                }
                self.pending_releases.extend(releases);
                for (_, _, reply) in claims {
                    let _ = reply.send(Err(failure("claim messages")));
                }
            }
        }
        for queue in QueueName::ALL {
            if woken[slot(queue)] {
                self.ready[slot(queue)].notify_waiters();
            }
        }
    }

    /// Stops renewing a message's claim (if that lease still holds it).
    fn forget(&mut self, lease: Lease) {
        if self.held.get(&lease.id) == Some(&lease.token) {
            self.held.remove(&lease.id);
        }
    }

    /// The transaction of one batch.
    async fn execute(
        &mut self,
        now: i64,
        rows: Vec<(QueueName, Prepared)>,
        settles: &[(Lease, Settlement)],
        releases: &[Lease],
        claims: &[(QueueName, usize)],
    ) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut outcome = Outcome::default();
        self.insert(&mut tx, now, rows).await?;

        // A message may appear twice (a stale holder and the current one):
        // the statements match exact (id, lease) pairs.
        let mut acks = Vec::new();
        let mut requeues: Vec<(i64, i64)> = releases.iter().map(|l| (l.id, l.token)).collect();
        let mut dead = Vec::new();
        for (lease, settlement) in settles {
            let target = match settlement {
                Settlement::Ack => &mut acks,
                Settlement::Requeue => &mut requeues,
                Settlement::DeadLetter => &mut dead,
            };
            target.push((lease.id, lease.token));
        }
        if !acks.is_empty() {
            let matched = sqlx::query(ACK_SQL)
                .bind(leases_json(acks))
                .fetch_all(&mut *tx)
                .await?;
            record(&mut outcome, matched)?;
        }
        if !requeues.is_empty() {
            let matched = sqlx::query(REQUEUE_SQL)
                .bind(now)
                .bind(leases_json(requeues))
                .fetch_all(&mut *tx)
                .await?;
            record(&mut outcome, matched)?;
        }
        if !dead.is_empty() {
            let matched = sqlx::query(DEAD_LETTER_SQL)
                .bind(now)
                .bind("rejected")
                .bind(leases_json(dead))
                .fetch_all(&mut *tx)
                .await?;
            record(&mut outcome, matched)?;
        }

        for &(queue, max) in claims {
            let claimed = self.claim(&mut tx, now, queue, max).await?;
            outcome.claimed.push(claimed);
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Inserts the published messages, in order, in statements of `2^k`
    /// rows.
    async fn insert(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        now: i64,
        rows: Vec<(QueueName, Prepared)>,
    ) -> Result<(), sqlx::Error> {
        let mut remaining = rows.len();
        let mut rows = rows.into_iter();
        while remaining > 0 {
            let log2 =
                ((usize::BITS - 1 - remaining.leading_zeros()) as usize).min(MAX_INSERT_LOG2);
            let chunk = 1usize << log2;
            let mut query = sqlx::query(AssertSqlSafe(self.insert_sql[log2].clone()));
            for (queue, message) in rows.by_ref().take(chunk) {
                query = query
                    .bind(queue.as_str())
                    .bind(message.body)
                    .bind(message.headers)
                    .bind(now)
                    .bind(now);
            }
            query.execute(&mut **tx).await?;
            remaining -= chunk;
        }
        Ok(())
    }

    /// Claims up to `max` messages of `queue`; those past the delivery limit
    /// go to the dead-letter queue instead.
    async fn claim(
        &mut self,
        tx: &mut Transaction<'static, Sqlite>,
        now: i64,
        queue: QueueName,
        max: usize,
    ) -> Result<Claimed, sqlx::Error> {
        let token = self.next_lease;
        self.next_lease = self.next_lease.wrapping_add(1);
        let found = sqlx::query(CLAIM_SQL)
            .bind(now.saturating_add(self.visibility_ms))
            .bind(token)
            .bind(queue.as_str())
            .bind(now)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&mut **tx)
            .await?;
        let mut claimed = Claimed::default();
        let mut over_limit = Vec::new();
        for row in found {
            let id: i64 = row.try_get(0)?;
            let delivery_count: i64 = row.try_get(3)?;
            if delivery_count > self.delivery_limit {
                over_limit.push((id, token));
                continue;
            }
            claimed.rows.push(ClaimedRow {
                lease: Lease { id, token, queue },
                body: row.try_get(1)?,
                headers: row.try_get(2)?,
                delivery_count,
            });
        }
        if !over_limit.is_empty() {
            let moved = sqlx::query(DEAD_LETTER_SQL)
                .bind(now)
                .bind("delivery_limit")
                .bind(leases_json(over_limit))
                .execute(&mut **tx)
                .await?;
            claimed.dead_lettered = usize::try_from(moved.rows_affected()).unwrap_or(0);
            warn!(
                %queue,
                count = claimed.dead_lettered,
                limit = self.delivery_limit,
                "messages delivered too often were moved to the dead-letter queue"
            );
        }
        claimed.rows.sort_by_key(|row| row.lease.id);
        Ok(claimed)
    }
}

/// Records which `(id, lease)` pairs a settling statement matched.
fn record(outcome: &mut Outcome, matched: Vec<SqliteRow>) -> Result<(), sqlx::Error> {
    for row in matched {
        outcome.settled.insert((row.try_get(0)?, row.try_get(1)?));
    }
    Ok(())
}

/// One consumer stream: claims up to its free credit whenever its buffer is
/// empty, waits for a wake-up when nothing is ready.
struct Consumer {
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
    /// The next message; `None` once the broker is shut down.
    async fn next(&mut self) -> Option<ReceivedMessage> {
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
struct EmbeddedAcker {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements_have_the_right_shape() {
        assert_eq!(
            insert_sql(0).as_ref(),
            "INSERT INTO broker_messages (queue, body, headers, visible_at, published_at) VALUES (?, ?, ?, ?, ?)"
        );
        assert_eq!(insert_sql(MAX_INSERT_LOG2).matches('?').count(), 5 * 256);
    }

    #[test]
    fn leases_encode_as_json_pairs() {
        assert_eq!(leases_json([(7, 42), (8, 43)]), "[[7,42],[8,43]]");
        assert_eq!(leases_json([]), "[]");
    }

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
