//! The dispatcher end to end: real PostgreSQL (`PgStore`), real RabbitMQ (`RabbitBroker`)
//! and a real local HTTP receiver that checks every request with the `standardwebhooks`
//! crate. Each test has its own database and queue prefix, so tests run in parallel.

mod support;

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hookline_broker::{Broker, ChangeNotice, OutgoingMessage, QueueName};
use hookline_core::model::{
    DeliveryStatus, ErrorClass, RegistryChange, SubscriptionSecret, SubscriptionState,
};
use hookline_core::signing::generate_secret;
use hookline_core::{Id, IdKind};
use hookline_dispatcher::DispatcherConfig;
use hookline_store::port::{DeliveryStore, RegistryStore};

use support::{Behaviour, DEADLINE, Harness, Receiver, eventually, refusing_url};

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn delivers_the_exact_bytes_signed_and_records_success() {
    let h = Harness::start().await;
    let receiver = Receiver::start(Behaviour::Status(200, "thanks")).await;
    let (sub, secret) = h.subscribe(&receiver.url, None).await;
    // Odd spacing, key order and a non-ASCII character: re-serialising would change them.
    let payload = r#"{"b": 1,  "a":[1, 2.50],"u":"caf\u00e9 é"}"#.as_bytes();
    let job = h.publish(&sub.id, payload).await;

    let got = receiver.wait_for(1).await;
    let req = &got[0];
    assert_eq!(req.body, payload);
    assert!(
        req.verifies_with(&secret),
        "standardwebhooks rejects {req:?}"
    );
    assert_eq!(req.header("webhook-id"), job.event_id.to_string());
    let ts: i64 = req.header("webhook-timestamp").parse().expect("a number");
    assert!((Utc::now().timestamp() - ts).abs() < 60);
    assert_eq!(req.header("webhook-signature").matches("v1,").count(), 1);
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(req.header("user-agent"), h.user_agent);
    assert_eq!(req.header("x-team"), "billing");

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
        .await;
    assert_eq!(d.attempt_count, 1);
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status_code, Some(200));
    assert_eq!(attempts[0].error_class, None);
    assert_eq!(attempts[0].response_excerpt, b"thanks");
    h.finish().await;
}

#[tokio::test]
async fn a_server_error_is_retried_per_schedule_until_the_schedule_is_spent() {
    let h = Harness::start().await;
    // Retry-After is honoured on 429 and 503 only: this one must be ignored.
    let receiver = Receiver::start(Behaviour::RetryAfter(500, "30")).await;
    let (sub, _) = h
        .subscribe(&receiver.url, Some(vec![Duration::from_millis(100)]))
        .await;
    let job = h.publish(&sub.id, br#"{"n":1}"#).await;

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    let first = &attempts[0];
    assert_eq!(first.status_code, Some(500));
    assert_eq!(first.error_class, Some(ErrorClass::Status));
    assert_eq!(first.response_excerpt, b"slow down");
    let next = d.next_attempt_at.expect("a next attempt time");
    // 100 ms ± 20% after the attempt, not 30 s.
    assert!(
        next >= first.started_at + chrono::Duration::milliseconds(80),
        "{next} vs {}",
        first.started_at
    );
    assert!(
        next < first.started_at + chrono::Duration::seconds(10),
        "{next} vs {}",
        first.started_at
    );

    // Act as the retry service: take the due retry and queue it on `retries`.
    let retry = eventually("the retry to come due", || async {
        let jobs = h
            .store
            .promote_due_retries(Utc::now(), 10)
            .await
            .expect("promote due retries");
        jobs.into_iter().next()
    })
    .await;
    assert_eq!(retry.delivery_id, job.delivery_id);
    assert_eq!(retry.attempt_number, 2);
    h.queue(QueueName::Retries, &retry).await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Failed)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].status_code, Some(500));
    let got = receiver.wait_for(2).await;
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    h.finish().await;
}

#[tokio::test]
async fn a_hanging_receiver_times_out() {
    let h = Harness::start_with(DispatcherConfig {
        request_timeout: Duration::from_millis(500),
        ..support::test_config()
    })
    .await;
    let receiver = Receiver::start(Behaviour::Hang).await;
    let (sub, _) = h.subscribe(&receiver.url, None).await;
    let job = h.publish(&sub.id, b"{}").await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].error_class,
        Some(ErrorClass::Timeout),
        "{:?}",
        attempts[0]
    );
    assert_eq!(attempts[0].status_code, None);
    assert!(attempts[0].duration_ms >= 400, "{:?}", attempts[0]);
    h.finish().await;
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let h = Harness::start().await;
    let (sub, _) = h.subscribe(&refusing_url().await, None).await;
    let job = h.publish(&sub.id, b"{}").await;

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    assert!(d.next_attempt_at.is_some());
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].error_class,
        Some(ErrorClass::Connect),
        "{:?}",
        attempts[0]
    );
    assert!(attempts[0].error_message.is_some());
    h.finish().await;
}

#[tokio::test]
async fn gone_disables_the_subscription_and_later_deliveries_fail_without_a_request() {
    let h = Harness::start().await;
    let mut changes = h.broker.changes().await.expect("follow changes");
    let receiver = Receiver::start(Behaviour::Status(410, "gone")).await;
    let (sub, _) = h.subscribe(&receiver.url, None).await;
    let job = h.publish(&sub.id, b"{}").await;

    h.wait_status(&job.delivery_id, DeliveryStatus::Failed)
        .await;
    let stored = h
        .store
        .get_subscription(&sub.id)
        .await
        .expect("subscription");
    assert_eq!(stored.state, SubscriptionState::Disabled);
    assert_eq!(
        stored.disabled_reason.as_deref(),
        Some("endpoint answered 410 Gone")
    );
    let expected = RegistryChange::Subscription {
        tenant_id: sub.tenant_id.clone(),
        subscription_id: sub.id.clone(),
    };
    let announced = tokio::time::timeout(DEADLINE, async {
        while let Some(notice) = changes.next().await {
            if let ChangeNotice::Change(body) = notice
                && serde_json::from_slice::<RegistryChange>(&body).ok() == Some(expected.clone())
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(announced, Ok(true), "the disabling is announced");

    let second = h.publish(&sub.id, b"{}").await;
    let d = h
        .wait_status(&second.delivery_id, DeliveryStatus::Failed)
        .await;
    assert_eq!(d.last_error.as_deref(), Some("subscription is disabled"));
    assert!(h.attempts(&second.delivery_id).await.is_empty());
    assert_eq!(receiver.received().len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let h = Harness::start().await;
    let receiver = Receiver::start(Behaviour::RetryAfter(429, "3")).await;
    let (sub, _) = h
        .subscribe(&receiver.url, Some(vec![Duration::from_millis(100)]))
        .await;
    let job = h.publish(&sub.id, b"{}").await;

    let d = h
        .wait_status(&job.delivery_id, DeliveryStatus::Retrying)
        .await;
    let attempts = h.attempts(&job.delivery_id).await;
    assert_eq!(attempts[0].status_code, Some(429));
    let next = d.next_attempt_at.expect("a next attempt time");
    assert!(
        next >= attempts[0].started_at + chrono::Duration::seconds(3),
        "next attempt {next} is sooner than Retry-After allows (attempt at {})",
        attempts[0].started_at
    );
    h.finish().await;
}

#[tokio::test]
async fn every_live_secret_signs_until_it_expires() {
    let h = Harness::start().await;
    let receiver = Receiver::start(Behaviour::Status(204, "")).await;
    let (sub, old) = h.subscribe(&receiver.url, None).await;
    let new = generate_secret();
    let old_expires_at = Utc::now() + chrono::Duration::seconds(3);
    h.store
        .rotate_secret(
            &SubscriptionSecret {
                id: Id::new(IdKind::Secret),
                subscription_id: sub.id.clone(),
                secret: new.clone(),
                created_at: Utc::now(),
                expires_at: None,
            },
            old_expires_at,
        )
        .await
        .expect("rotate");

    let first = h.publish(&sub.id, br#"{"rotation":1}"#).await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].header("webhook-signature").matches("v1,").count(), 2);
    assert!(got[0].verifies_with(&old), "the old secret verifies");
    assert!(got[0].verifies_with(&new), "the new secret verifies");
    h.wait_status(&first.delivery_id, DeliveryStatus::Succeeded)
        .await;

    // The cached subscription still holds the old secret; past its expiry it must not sign.
    let wait = (old_expires_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let second = h.publish(&sub.id, br#"{"rotation":2}"#).await;
    let got = receiver.wait_for(2).await;
    assert_eq!(got[1].header("webhook-signature").matches("v1,").count(), 1);
    assert!(got[1].verifies_with(&new));
    assert!(!got[1].verifies_with(&old));
    h.wait_status(&second.delivery_id, DeliveryStatus::Succeeded)
        .await;
    h.finish().await;
}

#[tokio::test]
async fn an_announced_change_refreshes_the_cached_subscription() {
    let h = Harness::start().await;
    let before = Receiver::start(Behaviour::Status(200, "")).await;
    let after = Receiver::start(Behaviour::Status(200, "")).await;
    let (sub, _) = h.subscribe(&before.url, None).await;
    let job = h.publish(&sub.id, b"{}").await;
    h.wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
        .await;

    let mut moved = sub.clone();
    moved.url = after.url.clone();
    h.store.update_subscription(&moved).await.expect("update");
    let change = RegistryChange::Subscription {
        tenant_id: sub.tenant_id.clone(),
        subscription_id: sub.id.clone(),
    };
    h.broker
        .announce(serde_json::to_vec(&change).expect("json"))
        .await
        .expect("announce");

    // The announcement reaches the dispatcher asynchronously: deliver until one lands at
    // the new URL (well before the cache's own expiry).
    eventually("a delivery at the new URL", || async {
        let job = h.publish(&sub.id, b"{}").await;
        h.wait_status(&job.delivery_id, DeliveryStatus::Succeeded)
            .await;
        (!after.received().is_empty()).then_some(())
    })
    .await;
    h.finish().await;
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered() {
    let h = Harness::start().await;
    h.broker
        .publish(
            QueueName::Deliveries,
            vec![OutgoingMessage::new(b"not a job".to_vec())],
        )
        .await
        .expect("publish");
    eventually("the message in the dead-letter queue", || async {
        let depth = h.broker.dead_letter_depth().await.expect("depth");
        (depth >= 1).then_some(())
    })
    .await;
    h.finish().await;
}
