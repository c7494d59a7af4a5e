//! The one task that performs every write of the embedded queue (publish, claim,
//! settle, renew), batching whatever commands wait into one `BEGIN IMMEDIATE`
//! transaction (group commit); see the parent module for why.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, trace, warn};

use super::sql::{
    ACK_SQL, CLAIM_SQL, DEAD_LETTER_SQL, MAX_INSERT_LOG2, RENEW_SQL, REQUEUE_SQL, leases_json,
};
use super::{now_ms, slot};
use crate::{BrokerError, OutgoingMessage, QueueName, Settlement};

/// Most commands one writer transaction takes.
pub(super) const MAX_COMMANDS_PER_TRANSACTION: usize = 1024;

/// SQLite's default limit on the size of one value (`SQLITE_MAX_LENGTH`).
pub(super) const MAX_VALUE_LEN: usize = 1_000_000_000;

/// Delay before the writer retries putting back messages whose settlement
/// failed.
pub(super) const RELEASE_RETRY_DELAY: Duration = Duration::from_millis(500);

/// A message ready to insert.
pub(super) struct Prepared {
    pub(super) body: Vec<u8>,
    pub(super) headers: String,
}

pub(super) fn prepare(index: usize, message: OutgoingMessage) -> Result<Prepared, BrokerError> {
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
pub(super) struct Lease {
    pub(super) id: i64,
    pub(super) token: i64,
    pub(super) queue: QueueName,
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

/// What the writer task is asked to do.
pub(super) enum Command {
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
pub(super) struct ClaimedRow {
    pub(super) lease: Lease,
    pub(super) body: Vec<u8>,
    pub(super) headers: String,
    pub(super) delivery_count: i64,
}

/// The result of one claim.
#[derive(Default)]
pub(super) struct Claimed {
    pub(super) rows: Vec<ClaimedRow>,
    /// Messages that were over the delivery limit and went to the
    /// dead-letter queue instead.
    pub(super) dead_lettered: usize,
}

/// The task that performs every write of the adapter (see the module
/// documentation).
pub(super) struct Writer {
    pub(super) pool: SqlitePool,
    pub(super) visibility_ms: i64,
    pub(super) delivery_limit: i64,
    pub(super) renew_every: Duration,
    pub(super) receiver: mpsc::UnboundedReceiver<Command>,
    pub(super) ready: Arc<[Notify]>,
    pub(super) shutdown: CancellationToken,
    /// Messages handed out and not settled yet: id → lease token.
    pub(super) held: HashMap<i64, i64>,
    /// Messages to put back whose first attempt failed.
    pub(super) pending_releases: Vec<Lease>,
    pub(super) next_lease: i64,
    /// `insert_sql[k]` inserts `2^k` rows.
    pub(super) insert_sql: Vec<Arc<str>>,
}

/// What one transaction of the writer changed.
#[derive(Default)]
pub(super) struct Outcome {
    /// `(id, lease)` of every message settled as asked.
    settled: HashSet<(i64, i64)>,
    /// One result per claim, in order.
    claimed: Vec<Claimed>,
}

/// The commands of one writer transaction, sorted by kind.
#[derive(Default)]
struct Batch {
    rows: Vec<(QueueName, Prepared)>,
    published: Vec<(QueueName, Reply<()>)>,
    settles: Vec<(Lease, Settlement, Option<Reply<()>>)>,
    claims: Vec<(QueueName, usize, Reply<Claimed>)>,
}

impl Batch {
    /// Sorts `commands`; while `closing`, claims are refused at once.
    fn sort(commands: Vec<Command>, closing: bool) -> Self {
        let mut batch = Self::default();
        for command in commands {
            match command {
                Command::Publish {
                    queue,
                    messages,
                    reply,
                } => {
                    batch.rows.extend(messages.into_iter().map(|m| (queue, m)));
                    batch.published.push((queue, reply));
                }
                Command::Settle {
                    lease,
                    settlement,
                    reply,
                } => batch.settles.push((lease, settlement, reply)),
                Command::Claim { reply, .. } if closing => {
                    let _ = reply.send(Err(BrokerError::Closed));
                }
                Command::Claim { queue, max, reply } => batch.claims.push((queue, max, reply)),
            }
        }
        batch
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.settles.is_empty() && self.claims.is_empty()
    }
}

impl Writer {
    pub(super) async fn run(mut self) {
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
    async fn run_batch(&mut self, commands: Vec<Command>, closing: bool) {
        let mut batch = Batch::sort(commands, closing);
        let releases = std::mem::take(&mut self.pending_releases);
        if batch.is_empty() && releases.is_empty() {
            return;
        }
        let settle_requests: Vec<(Lease, Settlement)> =
            batch.settles.iter().map(|(l, s, _)| (*l, *s)).collect();
        let claim_requests: Vec<(QueueName, usize)> =
            batch.claims.iter().map(|(q, max, _)| (*q, *max)).collect();
        let row_count = batch.rows.len();
        let rows = std::mem::take(&mut batch.rows);

        let result = self
            .execute(now_ms(), rows, &settle_requests, &releases, &claim_requests)
            .await;
        trace!(
            published = row_count,
            settled = settle_requests.len(),
            claims = claim_requests.len(),
            ok = result.is_ok(),
            "embedded queue transaction"
        );
        let woken = match result {
            Ok(outcome) => self.answer_committed(batch, releases, outcome),
            Err(error) => {
                warn!(%error, published = row_count, settled = settle_requests.len(), claims = claim_requests.len(), "embedded queue transaction failed");
                self.answer_failed(batch, releases, &error.to_string());
                Vec::new()
            }
        };
        for (index, woken) in woken.into_iter().enumerate() {
            if woken {
                self.ready[index].notify_waiters();
            }
        }
    }

    /// Answers the commands of a committed transaction; returns which queues
    /// gained visible messages.
    fn answer_committed(
        &mut self,
        batch: Batch,
        releases: Vec<Lease>,
        outcome: Outcome,
    ) -> Vec<bool> {
        let mut woken = vec![false; self.ready.len()];
        for (queue, reply) in batch.published {
            woken[slot(queue)] = true;
            let _ = reply.send(Ok(()));
        }
        for (lease, settlement, reply) in batch.settles {
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
        for ((_, _, reply), claimed) in batch.claims.into_iter().zip(outcome.claimed) {
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
        woken
    }

    /// Answers the commands of a failed transaction: every settled or
    /// released message is put back soon, every caller learns of the failure.
    fn answer_failed(&mut self, batch: Batch, releases: Vec<Lease>, error: &str) {
        let failure = |what: &str| {
            BrokerError::backend(
                format!("{what} in the embedded queue"),
                format!("the transaction failed: {error}"),
            )
        };
        for (_, reply) in batch.published {
            let _ = reply.send(Err(failure("store published messages")));
        }
        for (lease, _, reply) in batch.settles {
            // Whatever was asked, the message must come back soon:
            // the caller learns that it will be redelivered.
            self.forget(lease);
            self.pending_releases.push(lease);
            if let Some(reply) = reply {
                let _ = reply.send(Err(failure("settle a message")));
            }
        }
        self.pending_releases.extend(releases);
        for (_, _, reply) in batch.claims {
            let _ = reply.send(Err(failure("claim messages")));
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
                    .bind(queue.name())
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
            .bind(queue.name())
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
pub(super) fn record(outcome: &mut Outcome, matched: Vec<SqliteRow>) -> Result<(), sqlx::Error> {
    for row in matched {
        outcome.settled.insert((row.try_get(0)?, row.try_get(1)?));
    }
    Ok(())
}
