//! Helpers shared by the RabbitMQ tests: unique prefixes, connecting, forcing
//! a broker's connections closed, waiting on conditions with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hookline_broker::{
    Broker, BrokerError, OutgoingMessage, QueueName, RabbitBroker, RabbitConfig,
};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hookline_broker=debug,lapin=warn".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// A prefix no other test (or test run) uses.
pub fn unique_prefix() -> String {
    format!("test_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Configuration for `prefix`; the connection name is the prefix itself so
/// that the test can find its connections.
pub fn config(prefix: &str) -> RabbitConfig {
    let mut cfg = RabbitConfig::new(URL, prefix);
    cfg.connection_name = prefix.to_owned();
    cfg
}

pub async fn connect(prefix: &str) -> RabbitBroker {
    init();
    RabbitBroker::connect(config(prefix))
        .await
        .expect("connect to RabbitMQ at 127.0.0.1:5672")
}

/// Awaits `fut`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// The next item of a stream that must not end.
pub async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    within(what, stream.next())
        .await
        .unwrap_or_else(|| panic!("stream ended while waiting for {what}"))
}

pub fn messages(tag: &str, range: std::ops::Range<usize>) -> Vec<OutgoingMessage> {
    range
        .map(|i| OutgoingMessage::new(format!("{tag}-{i}")).with_header("n", i.to_string()))
        .collect()
}

/// Publishes as the outbox relay would: a transient failure (the connection
/// was lost under the publish) is retried, until the deadline.
pub async fn publish_until_confirmed(
    broker: &RabbitBroker,
    queue: QueueName,
    batch: Vec<OutgoingMessage>,
) {
    within("a confirmed publish", async {
        loop {
            match broker.publish(queue, batch.clone()).await {
                Ok(()) => return,
                Err(error) if error.is_transient() => {
                    eprintln!("publish failed, retrying as a caller would: {error}");
                }
                Err(error) => panic!("publish failed for good: {error}"),
            }
        }
    })
    .await
}

/// Polls `check` (every 50 ms) until it returns true, failing at the deadline.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Forces RabbitMQ to close every connection whose client-provided name is
/// `name` (and only those: other suites share the broker). Returns how many
/// were closed.
pub async fn close_connections_named(name: &str) -> usize {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["-s", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .expect("run rabbitmqctl list_connections");
    assert!(
        output.status.success(),
        "rabbitmqctl list_connections failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    // client_properties reads: [..., {"connection_name","<name>"}, ...]
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let pids: Vec<String> = listing
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split('\t').next())
        .map(|pid| pid.trim().to_owned())
        .collect();
    for pid in &pids {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test"])
            .status()
            .await
            .expect("run rabbitmqctl close_connection");
        assert!(
            status.success(),
            "rabbitmqctl close_connection {pid} failed"
        );
    }
    pids.len()
}

/// Deletes the test's topology and closes the broker.
pub async fn cleanup(broker: RabbitBroker) {
    broker
        .delete_topology()
        .await
        .expect("delete the test topology");
    broker.close().await;
}

pub fn is_stale(result: &Result<(), BrokerError>) -> bool {
    matches!(result, Err(BrokerError::StaleDelivery))
}
