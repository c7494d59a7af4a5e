//! The shard topology of fair delivery on both adapters (real RabbitMQ, a real SQLite
//! file): shard queues exist and are separate, the unsharded queues still work beside
//! them, lowering `delivery_shards` strands nothing, and the router spreads a tenant's
//! burst over its hand and keeps other tenants off a loaded shard.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hookline_broker::shards::{ShardRouter, TenantWeights, hand};
use hookline_broker::{
    Broker, EmbeddedBroker, EmbeddedConfig, OutgoingMessage, QueueKind, QueueName,
};
use hookline_core::job::{H_SUBSCRIPTION, H_TENANT};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

const D: QueueKind = QueueKind::Deliveries;

/// A database file of its own, removed (with its WAL files) on drop.
struct TestDb(std::path::PathBuf);

impl TestDb {
    fn new() -> Self {
        let name = format!("hookline-shards-test-{}.db", ulid::Ulid::new());
        Self(std::env::temp_dir().join(name))
    }

    async fn pool(&self) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(&self.0)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("open the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn embedded(pool: &SqlitePool, shards: u16) -> EmbeddedBroker {
    let cfg = EmbeddedConfig {
        delivery_shards: shards,
        ..EmbeddedConfig::default()
    };
    EmbeddedBroker::open(pool.clone(), cfg)
        .await
        .expect("open the embedded queue")
}

async fn rabbit(prefix: &str, shards: u16) -> hookline_broker::RabbitBroker {
    init();
    let mut cfg = config(prefix);
    cfg.delivery_shards = shards;
    hookline_broker::RabbitBroker::connect(cfg)
        .await
        .expect("connect to RabbitMQ")
}

/// Shard queues are separate queues beside the unsharded ones, each consumed alone.
async fn shard_queues_are_separate(broker: &dyn Broker) {
    assert_eq!(broker.delivery_shards(), 4);
    assert_eq!(broker.consumed_shards().await.unwrap(), 4);
    broker
        .publish(QueueName::Shard(D, 3), messages("s3", 0..5))
        .await
        .unwrap();
    broker
        .publish(
            QueueName::Shard(QueueKind::Retries, 0),
            messages("r0", 0..2),
        )
        .await
        .unwrap();
    broker
        .publish(QueueName::Deliveries, messages("legacy", 0..1))
        .await
        .unwrap();
    let depth = |q| async move { broker.queue_depth(q).await.unwrap() };
    eventually("shard depths", || async {
        depth(QueueName::Shard(D, 3)).await == 5
    })
    .await;
    assert_eq!(depth(QueueName::Shard(D, 0)).await, 0);
    assert_eq!(depth(QueueName::Shard(QueueKind::Retries, 0)).await, 2);
    assert_eq!(depth(QueueName::Deliveries).await, 1);

    let mut stream = broker.consume(QueueName::Shard(D, 3), 8).await.unwrap();
    for _ in 0..5 {
        let message = next(&mut stream, "a shard message").await;
        assert!(String::from_utf8_lossy(&message.body).starts_with("s3-"));
        message.ack().await.unwrap();
    }
    let mut legacy = broker.consume(QueueName::Deliveries, 1).await.unwrap();
    let message = next(&mut legacy, "the unsharded message").await;
    assert_eq!(message.body, b"legacy-0");
    message.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_shard_queues_are_separate_and_lowering_strands_nothing() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = embedded(&pool, 4).await;
    shard_queues_are_separate(&broker).await;
    broker
        .publish(QueueName::Shard(D, 3), messages("kept", 0..1))
        .await
        .unwrap();
    let oldest = broker
        .oldest_published_ms(QueueName::Shard(D, 3))
        .await
        .unwrap();
    assert!(
        oldest.is_some(),
        "the embedded queue knows its oldest message"
    );
    broker.close().await;

    // Lowered to 2: shard 3 still holds a message, so consumers serve 4 shards.
    let lowered = embedded(&pool, 2).await;
    assert_eq!(lowered.delivery_shards(), 2);
    assert_eq!(lowered.consumed_shards().await.unwrap(), 4);
    let mut stream = lowered.consume(QueueName::Shard(D, 3), 1).await.unwrap();
    next(&mut stream, "the kept message")
        .await
        .ack()
        .await
        .unwrap();
    // Empty now: nothing past the setting is served any more.
    assert_eq!(lowered.consumed_shards().await.unwrap(), 2);
    lowered.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbit_shard_queues_are_separate_and_lowering_strands_nothing() {
    let prefix = unique_prefix();
    let broker = rabbit(&prefix, 4).await;
    shard_queues_are_separate(&broker).await;
    assert_eq!(
        broker
            .oldest_published_ms(QueueName::Shard(D, 3))
            .await
            .unwrap(),
        None
    );
    // Another process with a lower setting still serves every declared shard.
    let lowered = rabbit(&prefix, 2).await;
    assert_eq!(lowered.consumed_shards().await.unwrap(), 4);
    lowered.close().await;
    cleanup(broker).await;
}

/// Tenant `ten_heavy` weighs 4, everyone else 1.
struct Heavy;

#[async_trait::async_trait]
impl TenantWeights for Heavy {
    async fn weight(&self, tenant: &str) -> u32 {
        if tenant == "ten_heavy" { 4 } else { 1 }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavier_tenant_spreads_over_more_shards() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let inner: Arc<dyn Broker> = Arc::new(embedded(&pool, 16).await);
    let router = ShardRouter::new(inner.clone()).with_weights(Arc::new(Heavy));
    let burst: Vec<_> = (0..160).map(|n| job("ten_heavy", "sub_h", n)).collect();
    router.publish(QueueName::Deliveries, burst).await.unwrap();
    let mut used = BTreeSet::new();
    for shard in 0..16 {
        if inner.queue_depth(QueueName::Shard(D, shard)).await.unwrap() > 0 {
            used.insert(shard);
        }
    }
    let want: BTreeSet<u16> = hand("ten_heavy", 4, 16).into_iter().collect();
    assert_eq!(want.len(), 8);
    assert_eq!(
        used, want,
        "weight 4: a hand of 8 shards, all used by a burst"
    );
    drop(router);
    pool.close().await;
}

fn job(tenant: &str, subscription: &str, n: usize) -> OutgoingMessage {
    OutgoingMessage::new(format!("{tenant}-{n}"))
        .with_header(H_TENANT, tenant)
        .with_header(H_SUBSCRIPTION, subscription)
}

/// Messages per shard queue of `kind` (of 8).
async fn depths(broker: &dyn Broker, kind: QueueKind) -> BTreeMap<u16, u64> {
    let mut found = BTreeMap::new();
    for shard in 0..8 {
        let depth = broker
            .queue_depth(QueueName::Shard(kind, shard))
            .await
            .unwrap();
        if depth > 0 {
            found.insert(shard, depth);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_spreads_a_burst_over_the_hand_and_keeps_others_off_it() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let inner: Arc<dyn Broker> = Arc::new(embedded(&pool, 8).await);
    let router = ShardRouter::new(inner.clone());

    // Tenant A's burst lands on its hand only, spread evenly over both shards.
    let burst: Vec<_> = (0..200).map(|n| job("ten_a", "sub_a", n)).collect();
    router.publish(QueueName::Deliveries, burst).await.unwrap();
    let hand_a: BTreeSet<u16> = hand("ten_a", 1, 8).into_iter().collect();
    let found = depths(inner.as_ref(), D).await;
    assert_eq!(found.keys().copied().collect::<BTreeSet<_>>(), hand_a);
    assert!(found.values().all(|d| *d == 100), "{found:?}");
    assert_eq!(inner.queue_depth(QueueName::Deliveries).await.unwrap(), 0);

    // A tenant whose hand shares a shard with A's takes its other shard.
    let b = (0..1000)
        .map(|i| format!("ten_b{i}"))
        .find(|t| {
            let h: BTreeSet<u16> = hand(t, 1, 8).into_iter().collect();
            h.intersection(&hand_a).count() == 1
        })
        .expect("some tenant overlaps A by one shard");
    let free = *hand(&b, 1, 8).iter().find(|s| !hand_a.contains(s)).unwrap();
    let before = depths(inner.as_ref(), D).await;
    for n in 0..10 {
        router
            .publish(QueueName::Deliveries, vec![job(&b, "sub_b", n)])
            .await
            .unwrap();
    }
    let after = depths(inner.as_ref(), D).await;
    assert_eq!(after.get(&free).copied().unwrap_or(0), 10, "{after:?}");
    for shard in &hand_a {
        assert_eq!(
            after.get(shard),
            before.get(shard),
            "B stayed off A's shards"
        );
    }
    // Retries route the same way, onto the retries shards.
    router
        .publish(QueueName::Retries, vec![job("ten_a", "sub_a", 0)])
        .await
        .unwrap();
    let retries = depths(inner.as_ref(), QueueKind::Retries).await;
    assert!(retries.keys().all(|s| hand_a.contains(s)) && retries.len() == 1);
    drop(router);
    pool.close().await;
}
