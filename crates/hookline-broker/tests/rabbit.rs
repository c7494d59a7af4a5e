//! The RabbitMQ adapter against a real RabbitMQ (amqp://127.0.0.1:5672).
//! Every test uses its own prefix and deletes its topology at the end, so
//! tests and other suites run in parallel on the same broker.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::*;
use futures::StreamExt;
use hookline_broker::{
    Broker, BrokerError, ChangeNotice, OutgoingMessage, QueueName, RabbitBroker,
};

fn body(message: &hookline_broker::ReceivedMessage) -> String {
    String::from_utf8(message.body.clone()).expect("test bodies are UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_empties_the_queue() {
    let prefix = unique_prefix();
    let broker = connect(&prefix).await;
    const N: usize = 50;

    let batch: Vec<OutgoingMessage> = messages("m", 0..N)
        .into_iter()
        .map(|m| {
            m.with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
        })
        .collect();
    broker.publish(QueueName::Deliveries, batch).await.unwrap();
    assert_eq!(
        broker.queue_depth(QueueName::Deliveries).await.unwrap(),
        N as u64
    );
    assert_eq!(broker.queue_depth(QueueName::Retries).await.unwrap(), 0);

    let mut stream = broker.consume(QueueName::Deliveries, 10).await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < N {
        let message = next(&mut stream, "a delivery").await;
        assert!(!message.redelivered, "nothing was redelivered");
        let n = message.headers.get("n").expect("header n").clone();
        assert_eq!(body(&message), format!("m-{n}"));
        assert_eq!(
            message.headers.get("traceparent").map(String::as_str),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert!(seen.insert(body(&message)), "no duplicate");
        message.ack().await.unwrap();
    }
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 0);
    broker.close().await;
    assert!(stream.next().await.is_none(), "streams end at shutdown");

    // Had any acknowledgement been lost, closing would have put the message
    // back: a fresh connection sees an empty queue.
    let broker = connect(&prefix).await;
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 0);
    cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_moves_the_message_to_the_dead_letter_queue() {
    let prefix = unique_prefix();
    let broker = connect(&prefix).await;

    broker
        .publish(
            QueueName::Retries,
            vec![OutgoingMessage::new("poison").with_header("k", "v")],
        )
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Retries, 1).await.unwrap();

    // retry_later puts it back; it comes again, marked redelivered.
    let first = next(&mut stream, "the message").await;
    assert!(!first.redelivered);
    first.retry_later().await.unwrap();
    let again = next(&mut stream, "the requeued message").await;
    assert_eq!(body(&again), "poison");
    assert!(again.redelivered);
    again.dead_letter().await.unwrap();

    eventually("the message in the dead-letter queue", || async {
        broker.dead_letter_depth().await.unwrap() == 1
    })
    .await;
    assert_eq!(broker.queue_depth(QueueName::Retries).await.unwrap(), 0);

    // Read it back with a plain lapin channel: same body, same headers.
    let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let got = channel
        .basic_get(
            broker.dead_letter_queue_name().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a dead-lettered message");
    assert_eq!(got.delivery.data, b"poison");
    let headers = got.delivery.properties.headers().clone().unwrap();
    assert!(headers.inner().contains_key("k"));
    assert!(
        headers.inner().contains_key("x-death"),
        "RabbitMQ records why"
    );
    conn.close(200, "OK".into()).await.unwrap();

    cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_delivery_limit_is_dead_lettered() {
    let prefix = unique_prefix();
    init();
    let mut cfg = config(&prefix);
    cfg.delivery_limit = 2;
    let broker = RabbitBroker::connect(cfg).await.unwrap();

    broker
        .publish(
            QueueName::Deliveries,
            vec![OutgoingMessage::new("crashes consumers")],
        )
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Deliveries, 1).await.unwrap();
    // Each requeue counts as a failed delivery; past the limit the message
    // goes to the dead-letter queue instead of coming back.
    let mut deliveries = 0;
    let dead_lettered = within("the message to leave the queue", async {
        loop {
            tokio::select! {
                message = stream.next() => {
                    let message = message.expect("stream ends only at shutdown");
                    deliveries += 1;
                    message.retry_later().await.unwrap();
                }
                depth = broker.dead_letter_depth() => {
                    if depth.unwrap() == 1 {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    assert!(dead_lettered);
    assert!(
        deliveries >= 2,
        "delivered {deliveries} times before dead-lettering"
    );
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 0);
    cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_the_connection_is_forced_closed() {
    let prefix = unique_prefix();
    let broker = connect(&prefix).await;
    const N: usize = 30;
    const M: usize = 10;
    const HELD: usize = 5;

    broker
        .publish(QueueName::Deliveries, messages("before", 0..N))
        .await
        .unwrap();
    let mut stream = broker
        .consume(QueueName::Deliveries, HELD as u16)
        .await
        .unwrap();

    // Take a few and do not settle them.
    let mut held = Vec::new();
    for _ in 0..HELD {
        held.push(next(&mut stream, "a delivery").await);
    }
    let held_bodies: HashSet<String> = held.iter().map(body).collect();

    let closed = close_connections_named(&prefix).await;
    assert_eq!(closed, 1, "the broker has exactly one connection");

    // Publishing works again by itself (a caller retries a publish that the
    // drop interrupted, as the outbox relay does).
    publish_until_confirmed(&broker, QueueName::Deliveries, messages("after", 0..M)).await;

    // The held messages belong to the dead channel: settling them fails with
    // an error the caller can ignore.
    for message in held {
        let result = message.ack().await;
        assert!(is_stale(&result), "acking on a dead channel: {result:?}");
    }

    // Every message arrives (the held ones again, marked redelivered).
    let mut seen = HashSet::new();
    let mut redelivered_held = HashSet::new();
    while seen.len() < N + M {
        let message = next(&mut stream, "every message after the reconnection").await;
        let b = body(&message);
        if held_bodies.contains(&b) && message.redelivered {
            redelivered_held.insert(b.clone());
        }
        message.ack().await.unwrap();
        seen.insert(b);
    }
    for i in 0..N {
        assert!(seen.contains(&format!("before-{i}")), "before-{i} lost");
    }
    for i in 0..M {
        assert!(seen.contains(&format!("after-{i}")), "after-{i} lost");
    }
    assert_eq!(redelivered_held, held_bodies, "unacked messages come back");

    eventually("an empty queue", || async {
        broker.queue_depth(QueueName::Deliveries).await.ok() == Some(0)
    })
    .await;
    broker.ping().await.unwrap();
    cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_every_subscriber_and_resync_after_reconnection() {
    let prefix = unique_prefix();
    let broker = connect(&prefix).await;
    // A second process with its own connection, announcing.
    let announcer_prefix_conn = format!("{prefix}-announcer");
    init();
    let mut cfg = config(&prefix);
    cfg.connection_name = announcer_prefix_conn;
    let announcer = RabbitBroker::connect(cfg).await.unwrap();

    let mut first = broker.changes().await.unwrap();
    let mut second = broker.changes().await.unwrap();

    announcer
        .announce(b"tenant t1 changed".to_vec())
        .await
        .unwrap();
    for stream in [&mut first, &mut second] {
        assert_eq!(
            next(stream, "the change").await,
            ChangeNotice::Change(b"tenant t1 changed".to_vec())
        );
    }

    assert_eq!(close_connections_named(&prefix).await, 1);
    // Both subscriptions come back on the new connection and say so.
    for stream in [&mut first, &mut second] {
        assert_eq!(next(stream, "a resync notice").await, ChangeNotice::Resync);
    }

    announcer
        .announce(b"subscription s2 changed".to_vec())
        .await
        .unwrap();
    for stream in [&mut first, &mut second] {
        assert_eq!(
            next(stream, "the change after the reconnection").await,
            ChangeNotice::Change(b"subscription s2 changed".to_vec())
        );
    }

    announcer.close().await;
    cleanup(broker).await;
    assert!(first.next().await.is_none(), "streams end at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_the_topology_twice_works() {
    let prefix = unique_prefix();
    let one = connect(&prefix).await;
    init();
    let mut cfg = config(&prefix);
    cfg.connection_name = format!("{prefix}-two");
    let two = RabbitBroker::connect(cfg).await.unwrap();

    // They share the queues.
    one.publish(QueueName::Retries, messages("x", 0..3))
        .await
        .unwrap();
    let mut stream = two.consume(QueueName::Retries, 8).await.unwrap();
    for _ in 0..3 {
        next(&mut stream, "a message published by the other")
            .await
            .ack()
            .await
            .unwrap();
    }

    // A conflicting declaration (another delivery limit) fails at once with
    // an explanation, rather than retrying.
    let mut cfg = config(&prefix);
    cfg.delivery_limit = 7;
    let error = RabbitBroker::connect(cfg).await.unwrap_err();
    assert!(
        error.to_string().contains("PRECONDITION") || error.to_string().contains("inequivalent"),
        "{error}"
    );

    two.close().await;
    cleanup(one).await;
}

#[tokio::test]
async fn refused_credentials_fail_at_once_saying_what_to_check() {
    init();
    let mut cfg = config(&unique_prefix());
    cfg.url = "amqp://guest:not-the-password@127.0.0.1:5672/%2f".into();
    let started = std::time::Instant::now();
    let error = RabbitBroker::connect(cfg).await.unwrap_err();
    assert!(matches!(error, BrokerError::Refused(_)), "{error}");
    assert_eq!(
        error.to_string(),
        "RabbitMQ refused the login for user guest on 127.0.0.1:5672: check amqp_url"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "no retries"
    );
}

#[tokio::test]
async fn invalid_configuration_is_refused() {
    let error = RabbitBroker::connect(config("has space"))
        .await
        .unwrap_err();
    assert!(matches!(error, BrokerError::InvalidConfig(_)), "{error}");
    let mut cfg = config(&unique_prefix());
    cfg.url = "not a url".into();
    let error = RabbitBroker::connect(cfg).await.unwrap_err();
    assert!(matches!(error, BrokerError::InvalidConfig(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_missing_queue_is_an_error() {
    let prefix = unique_prefix();
    let broker = connect(&prefix).await;
    broker.delete_topology().await.unwrap();
    let error = broker
        .publish(QueueName::Deliveries, messages("lost", 0..2))
        .await
        .unwrap_err();
    // The exchange is gone too: either the channel is closed (404) or the
    // message is returned unroutable; never a silent success.
    assert!(error.is_transient(), "{error}");
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_share_the_connection() {
    let prefix = unique_prefix();
    let broker = std::sync::Arc::new(connect(&prefix).await);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            broker
                .publish(QueueName::Deliveries, messages(&format!("t{t}"), 0..25))
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(
        broker.queue_depth(QueueName::Deliveries).await.unwrap(),
        100
    );
    let broker = std::sync::Arc::into_inner(broker).expect("tasks are done");
    cleanup(broker).await;
}

#[tokio::test]
async fn an_unreachable_broker_fails_after_the_configured_wait() {
    init();
    let mut cfg = config(&unique_prefix());
    // Nothing listens on port 1.
    cfg.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    cfg.reconnect_max_wait = std::time::Duration::from_millis(300);
    let error = RabbitBroker::connect(cfg).await.unwrap_err();
    assert!(matches!(error, BrokerError::Unavailable { .. }), "{error}");
    assert!(
        !error.to_string().contains("guest:guest"),
        "no password in errors: {error}"
    );
}
