//! The egress policy at delivery time, through the whole dispatcher (PostgreSQL, RabbitMQ,
//! a real receiver): a refused address is recorded as an `egress` attempt and gets no
//! connection, including when a name is rebound to it after the create-time check.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use hookline_core::model::{DeliveryStatus, ErrorClass};
use hookline_dispatcher::DispatcherConfig;
use hookline_egress::ScriptedLookup;
use hookline_testkit::CountingListener;
use reqwest::Url;
use support::{Behaviour, Harness, Receiver, loopback_egress};

#[tokio::test]
async fn a_refused_literal_address_is_an_egress_attempt_with_no_connection() {
    let h = Harness::start().await;
    // The tests allow 127.0.0.1 only: 127.0.0.2 is loopback, refused.
    let refused = CountingListener::bind("127.0.0.2:0").await;
    let (sub, _) = h
        .subscribe(&format!("http://{}/hook", refused.addr), None)
        .await;
    let job = h.publish(&sub.id, b"{}").await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].error_class, Some(ErrorClass::Egress));
    assert_eq!(attempts[0].status_code, None);
    assert!(attempts[0].response_excerpt.is_empty());
    let message = attempts[0].error_message.clone().unwrap_or_default();
    assert!(
        message.starts_with("refused by the egress policy: 127.0.0.2 is a loopback address"),
        "{message}"
    );
    assert!(
        message.contains("HOOKLINE_EGRESS_ALLOW=127.0.0.2/32"),
        "{message}"
    );
    assert_eq!(refused.connections(), 0, "a connection was made");
    h.finish().await;
}

#[tokio::test]
async fn a_name_rebound_after_the_create_check_gets_no_connection() {
    let lookup = Arc::new(ScriptedLookup::default());
    let egress = loopback_egress(lookup.clone());
    let h = Harness::start_with(DispatcherConfig {
        egress: egress.clone(),
        ..support::test_config()
    })
    .await;
    // The same port on an allowed (127.0.0.1) and a refused (127.0.0.2) address.
    let refused = CountingListener::bind("127.0.0.2:0").await;
    let receiver = Receiver::start_at(
        SocketAddr::from(([127, 0, 0, 1], refused.addr.port())),
        Behaviour::Status(200, "ok"),
    )
    .await;
    let url = format!("http://hooks.test:{}/hook", refused.addr.port());

    // At create time the name resolves to an allowed address: the check passes.
    lookup.set("hooks.test", &["127.0.0.1".parse().unwrap()]);
    egress
        .check_url(&Url::parse(&url).unwrap())
        .await
        .expect("allowed at create time");
    let (sub, _) = h.subscribe(&url, None).await;

    // Then it rebinds to a refused address, with a private one beside it: nothing is
    // connected to.
    lookup.set(
        "hooks.test",
        &["127.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()],
    );
    let job = h.publish(&sub.id, b"{}").await;
    h.wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts[0].error_class, Some(ErrorClass::Egress));
    let message = attempts[0].error_message.clone().unwrap_or_default();
    assert!(message.contains("hooks.test resolves to"), "{message}");
    assert_eq!(refused.connections(), 0, "a connection was made");
    assert!(receiver.received().is_empty());

    // Back on the allowed address, delivery works: the answer DNS gives decides.
    lookup.set("hooks.test", &["127.0.0.1".parse().unwrap()]);
    let job = h.publish(&sub.id, b"{}").await;
    h.wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
        .await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(refused.connections(), 0);
    h.finish().await;
}
