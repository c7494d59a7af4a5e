//! Shuffle sharding: which shard queue a delivery goes to. The one routing rule of
//! fair delivery, used by every publisher through [`ShardRouter`].
//!
//! Each tenant is hashed (a stable hash, the same in every process and version) onto a
//! *hand* of `min(shards, 2 × weight)` distinct shard queues. A delivery goes to the
//! shard of its tenant's hand with the smallest known backlog ("power of two
//! choices"); ties go to the shard a stable hash of the subscription id prefers, so a
//! quiet subscription keeps to one shard. The known backlog of a shard is a snapshot of
//! its depth (refreshed in the background every [`REFRESH_INTERVAL`] while this process
//! publishes) plus what this process published to it since, so a burst spreads over the
//! hand at once. Two tenants share a whole hand only rarely (with 16 shards and hands
//! of 2: 1 in 120), and then still share dispatch capacity with nobody else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use hookline_core::job::{H_SUBSCRIPTION, H_TENANT};
use tokio::task::JoinHandle;

use crate::{
    Broker, BrokerError, ChangeStream, MAX_SHARDS, MessageStream, OutgoingMessage, QueueKind,
    QueueName,
};

/// Default number of shard queues per kind (`delivery_shards`).
pub const DEFAULT_SHARDS: u16 = 16;

/// Highest tenant weight; a tenant's hand holds `2 × weight` shards (at most all).
pub const MAX_WEIGHT: u32 = 16;

/// How often a publishing process reads the depth of every shard queue.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(300);

/// Header the router stamps on every message it routes: Unix milliseconds of the
/// publish (dispatchers report how long messages waited in each queue from it).
pub const H_PUBLISHED_MS: &str = "hl-published-ms";

/// The publish time a routed message carries, if any.
pub fn published_ms(headers: &std::collections::BTreeMap<String, String>) -> Option<i64> {
    headers.get(H_PUBLISHED_MS)?.parse().ok()
}

/// A stable 64-bit hash (FNV-1a, then the SplitMix64 finaliser): the same in every
/// process, unlike std's randomly seeded hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hand of a tenant: `min(shards, 2 × weight)` distinct shards in `0..shards`,
/// chosen by the tenant id's hash. A weight of 0 counts as 1.
pub fn hand(tenant: &str, weight: u32, shards: u16) -> Vec<u16> {
    let shards = shards.clamp(1, MAX_SHARDS);
    let size = usize::from(shards).min(2 * weight.clamp(1, MAX_WEIGHT) as usize);
    let seed = stable_hash(tenant.as_bytes());
    let mut hand = Vec::with_capacity(size);
    let mut draw = 0u64;
    while hand.len() < size {
        let shard = (mix(seed ^ draw.wrapping_mul(0x9e37_79b9)) % u64::from(shards)) as u16;
        if !hand.contains(&shard) {
            hand.push(shard);
        }
        draw += 1;
    }
    hand
}

/// The shard of `hand` with the smallest `backlog`; ties go to the one the
/// subscription's hash prefers.
pub fn pick(hand: &[u16], subscription: &str, backlog: impl Fn(u16) -> u64) -> u16 {
    let seed = stable_hash(subscription.as_bytes());
    hand.iter()
        .copied()
        .min_by_key(|&shard| (backlog(shard), mix(seed ^ u64::from(shard))))
        .unwrap_or(0)
}

/// A tenant's weight as the router sees it (1 to [`MAX_WEIGHT`]); looked up once per
/// tenant of every routed batch, so it should answer from a cache.
#[async_trait]
pub trait TenantWeights: Send + Sync + 'static {
    /// The weight of the tenant (an unknown tenant, or one that cannot be read: 1).
    async fn weight(&self, tenant: &str) -> u32;
}

/// Every tenant weighs 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct EqualWeights;

#[async_trait]
impl TenantWeights for EqualWeights {
    async fn weight(&self, _tenant: &str) -> u32 {
        1
    }
}

/// Known backlog per shard of both kinds, `[kind][shard]`.
struct Backlog {
    shards: u16,
    /// Depth read at the last refresh.
    snapshot: [Vec<AtomicU64>; 2],
    /// Routed by this process and not yet covered by a depth read.
    routed: [Vec<AtomicU64>; 2],
    /// Of those, the ones whose publish has returned (and so are in the next read).
    settled: [Vec<AtomicU64>; 2],
}

impl Backlog {
    fn new(shards: u16) -> Self {
        let row = || (0..shards).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Self {
            shards,
            snapshot: [row(), row()],
            routed: [row(), row()],
            settled: [row(), row()],
        }
    }

    fn known(&self, kind: QueueKind, shard: u16) -> u64 {
        let (k, s) = (kind_index(kind), usize::from(shard));
        self.snapshot[k][s]
            .load(Ordering::Relaxed)
            .saturating_add(self.routed[k][s].load(Ordering::Relaxed))
    }

    /// The known backlog of every shard of both kinds.
    fn total(&self) -> u64 {
        QueueKind::ALL
            .into_iter()
            .flat_map(|kind| (0..self.shards).map(move |shard| (kind, shard)))
            .fold(0u64, |sum, (kind, shard)| {
                sum.saturating_add(self.known(kind, shard))
            })
    }

    fn routed(&self, kind: QueueKind, shard: u16) {
        self.routed[kind_index(kind)][usize::from(shard)].fetch_add(1, Ordering::Relaxed);
    }

    /// `count` routed messages were published (or failed to be).
    fn settled(&self, kind: QueueKind, shard: u16, count: u64) {
        self.settled[kind_index(kind)][usize::from(shard)].fetch_add(count, Ordering::Relaxed);
    }

    /// Before a depth read: the published messages the read will include.
    fn start_read(&self, kind: QueueKind, shard: u16) -> u64 {
        self.settled[kind_index(kind)][usize::from(shard)].swap(0, Ordering::Relaxed)
    }

    /// After a depth read that started with `included` published messages.
    fn refreshed(&self, kind: QueueKind, shard: u16, depth: u64, included: u64) {
        let (k, s) = (kind_index(kind), usize::from(shard));
        self.snapshot[k][s].store(depth, Ordering::Relaxed);
        // Saturating: never below zero.
        let _ = self.routed[k][s].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
            Some(r.saturating_sub(included))
        });
    }

    /// A depth read failed: what it would have covered is still pending.
    fn read_failed(&self, kind: QueueKind, shard: u16, included: u64) {
        self.settled(kind, shard, included);
    }
}

fn kind_index(kind: QueueKind) -> usize {
    match kind {
        QueueKind::Deliveries => 0,
        QueueKind::Retries => 1,
    }
}

/// A [`Broker`] that routes what is published to [`QueueName::Deliveries`] or
/// [`QueueName::Retries`] onto the shard queues (by the `hl-tenant-id` and
/// `hl-subscription-id` headers of each message) and passes everything else through.
/// Every publisher of a process shares one, so routing is one rule in one place.
pub struct ShardRouter {
    inner: Arc<dyn Broker>,
    weights: Arc<dyn TenantWeights>,
    backlog: Arc<Backlog>,
    refresher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ShardRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRouter")
            .field("shards", &self.backlog.shards)
            .finish_non_exhaustive()
    }
}

impl ShardRouter {
    /// Routes onto the `inner.delivery_shards()` shards of `inner`, every tenant
    /// weighing 1 until [`with_weights`](Self::with_weights).
    pub fn new(inner: Arc<dyn Broker>) -> Self {
        let shards = inner.delivery_shards().clamp(1, MAX_SHARDS);
        Self {
            inner,
            weights: Arc::new(EqualWeights),
            backlog: Arc::new(Backlog::new(shards)),
            refresher: Mutex::new(None),
        }
    }

    /// Looks tenant weights up in `weights`.
    #[must_use]
    pub fn with_weights(mut self, weights: Arc<dyn TenantWeights>) -> Self {
        self.weights = weights;
        self
    }

    /// The shard queue of `hand` (its tenant's) a message of `kind` goes to now (and
    /// counts it as routed there).
    pub fn route(&self, kind: QueueKind, message: &OutgoingMessage, hand: &[u16]) -> QueueName {
        let subscription = message
            .headers
            .get(H_SUBSCRIPTION)
            .map_or("", String::as_str);
        let shard = pick(hand, subscription, |shard| self.backlog.known(kind, shard));
        self.backlog.routed(kind, shard);
        QueueName::Shard(kind, shard)
    }

    /// The hand of every tenant of the batch, its weight looked up once each.
    async fn hands_of(&self, messages: &[OutgoingMessage]) -> Vec<(String, Vec<u16>)> {
        let mut hands: Vec<(String, Vec<u16>)> = Vec::new();
        for message in messages {
            let tenant = message.headers.get(H_TENANT).map_or("", String::as_str);
            if !hands.iter().any(|(t, _)| t == tenant) {
                let weight = self.weights.weight(tenant).await;
                hands.push((tenant.to_owned(), hand(tenant, weight, self.backlog.shards)));
            }
        }
        hands
    }

    /// Starts the background depth refresh, once.
    fn ensure_refreshing(&self) {
        let mut refresher = self
            .refresher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if refresher.is_none() && tokio::runtime::Handle::try_current().is_ok() {
            let backlog = Arc::downgrade(&self.backlog);
            *refresher = Some(tokio::spawn(refresh(self.inner.clone(), backlog)));
        }
    }
}

impl Drop for ShardRouter {
    fn drop(&mut self) {
        if let Some(task) = self
            .refresher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// Reads every shard's depth every [`REFRESH_INTERVAL`] until the router is gone.
async fn refresh(broker: Arc<dyn Broker>, backlog: Weak<Backlog>) {
    loop {
        let Some(current) = backlog.upgrade() else {
            return;
        };
        for shard in 0..current.shards {
            for kind in QueueKind::ALL {
                let included = current.start_read(kind, shard);
                match broker.queue_depth(QueueName::Shard(kind, shard)).await {
                    Ok(depth) => current.refreshed(kind, shard, depth, included),
                    Err(_) => current.read_failed(kind, shard, included),
                }
            }
        }
        drop(current);
        tokio::time::sleep(REFRESH_INTERVAL).await;
    }
}

#[async_trait]
impl Broker for ShardRouter {
    async fn publish(
        &self,
        queue: QueueName,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(), BrokerError> {
        if queue.shard().is_some() || messages.is_empty() {
            return self.inner.publish(queue, messages).await;
        }
        self.ensure_refreshing();
        let kind = queue.kind();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            .to_string();
        let hands = self.hands_of(&messages).await;
        let mut groups: Vec<(QueueName, Vec<OutgoingMessage>)> = Vec::new();
        for mut message in messages {
            message
                .headers
                .insert(H_PUBLISHED_MS.to_owned(), now.clone());
            let tenant = message.headers.get(H_TENANT).map_or("", String::as_str);
            let shard = match hands.iter().find(|(t, _)| t == tenant) {
                Some((_, hand)) => self.route(kind, &message, hand),
                None => self.route(kind, &message, &hand(tenant, 1, self.backlog.shards)),
            };
            match groups.iter_mut().find(|(q, _)| *q == shard) {
                Some((_, group)) => group.push(message),
                None => groups.push((shard, vec![message])),
            }
        }
        let published = groups.into_iter().map(|(queue, group)| async move {
            let count = group.len() as u64;
            let result = self.inner.publish(queue, group).await;
            if let Some(shard) = queue.shard() {
                self.backlog.settled(kind, shard, count);
            }
            result
        });
        for result in futures::future::join_all(published).await {
            result?;
        }
        Ok(())
    }

    async fn consume(&self, queue: QueueName, prefetch: u16) -> Result<MessageStream, BrokerError> {
        self.inner.consume(queue, prefetch).await
    }

    async fn announce(&self, change: Vec<u8>) -> Result<(), BrokerError> {
        self.inner.announce(change).await
    }

    async fn changes(&self) -> Result<ChangeStream, BrokerError> {
        self.inner.changes().await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }

    async fn queue_depth(&self, queue: QueueName) -> Result<u64, BrokerError> {
        self.inner.queue_depth(queue).await
    }

    async fn dead_letter_depth(&self) -> Result<u64, BrokerError> {
        self.inner.dead_letter_depth().await
    }

    fn delivery_shards(&self) -> u16 {
        self.inner.delivery_shards()
    }

    async fn consumed_shards(&self) -> Result<u16, BrokerError> {
        self.inner.consumed_shards().await
    }

    async fn oldest_published_ms(&self, queue: QueueName) -> Result<Option<i64>, BrokerError> {
        self.inner.oldest_published_ms(queue).await
    }

    fn known_backlog(&self) -> Option<u64> {
        self.ensure_refreshing();
        Some(self.backlog.total())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable() {
        // Fixed values: a change here re-shards every tenant of a running cluster.
        assert_eq!(stable_hash(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(stable_hash(b"ten_1"), stable_hash(b"ten_1"));
        assert_ne!(stable_hash(b"ten_1"), stable_hash(b"ten_2"));
    }

    #[test]
    fn hands_are_distinct_shards_sized_by_weight() {
        for tenant in ["ten_a", "ten_b", "", "ten_01JABCDEF"] {
            for (weight, shards, size) in
                [(1, 16, 2), (0, 16, 2), (3, 16, 6), (16, 16, 16), (4, 3, 3)]
            {
                let hand = hand(tenant, weight, shards);
                assert_eq!(hand.len(), size, "{tenant} {weight} {shards}");
                assert!(hand.iter().all(|s| *s < shards));
                let mut sorted = hand.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), size);
            }
        }
        assert_eq!(hand("ten_a", 1, 16), hand("ten_a", 1, 16));
    }

    #[test]
    fn hands_spread_tenants_over_the_shards() {
        let mut used = [0u32; 16];
        for i in 0..1000 {
            for shard in hand(&format!("ten_{i}"), 1, 16) {
                used[usize::from(shard)] += 1;
            }
        }
        // 2000 picks over 16 shards: 125 each on average.
        assert!(used.iter().all(|n| (60..200).contains(n)), "{used:?}");
    }

    #[test]
    fn the_least_loaded_shard_of_the_hand_wins() {
        let backlog = |shard: u16| if shard == 3 { 1000 } else { 5 };
        assert_eq!(pick(&[3, 9], "sub_1", backlog), 9);
        assert_eq!(pick(&[9, 3], "sub_1", backlog), 9);
        // Equal backlogs: the subscription's own preference, stable.
        let even = |_| 0;
        let first = pick(&[3, 9], "sub_1", even);
        assert_eq!(pick(&[9, 3], "sub_1", even), first);
    }
}
