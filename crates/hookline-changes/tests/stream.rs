//! The typed change stream on both brokers: one follower per process fans every
//! announced change out to each cache's subscription, typed; an unreadable announcement
//! reaches them as `Resync`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hookline_broker::{Broker, EmbeddedBroker, EmbeddedConfig, RabbitBroker, RabbitConfig};
use hookline_changes::{RegistryChanges, RegistryNotice, announce};
use hookline_core::model::RegistryChange;
use hookline_core::{Id, IdKind};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

async fn fans_out_typed_changes(broker: Arc<dyn Broker>) {
    let shutdown = CancellationToken::new();
    let changes = RegistryChanges::follow(broker.as_ref(), shutdown.clone()).await;
    let (mut ingest, mut dispatcher) = (changes.subscribe(), changes.subscribe());
    let change = RegistryChange::Subscription {
        tenant_id: Id::new(IdKind::Tenant),
        subscription_id: Id::new(IdKind::Subscription),
    };
    announce(broker.as_ref(), &change).await.expect("announced");
    broker.announce(b"not a change".to_vec()).await.unwrap();
    for follower in [&mut ingest, &mut dispatcher] {
        let first = tokio::time::timeout(DEADLINE, follower.next()).await;
        assert_eq!(first.unwrap(), Some(RegistryNotice::Change(change.clone())));
        let second = tokio::time::timeout(DEADLINE, follower.next()).await;
        assert_eq!(second.unwrap(), Some(RegistryNotice::Resync));
    }
    shutdown.cancel();
}

#[tokio::test]
async fn embedded_changes_fan_out_typed() {
    let path =
        std::env::temp_dir().join(format!("{}.db", hookline_testkit::unique_name("changes_")));
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let broker = EmbeddedBroker::open(pool, EmbeddedConfig::default())
        .await
        .expect("open the embedded broker");
    fans_out_typed_changes(Arc::new(broker)).await;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test]
async fn rabbit_changes_fan_out_typed() {
    let prefix = hookline_testkit::unique_name("test_changes_");
    let mut cfg = RabbitConfig::new(hookline_testkit::amqp_url(), prefix.clone());
    cfg.connection_name = prefix;
    let broker = RabbitBroker::connect(cfg)
        .await
        .expect("connect to RabbitMQ");
    fans_out_typed_changes(Arc::new(broker)).await;
}
