//! Horizontal scaling on one machine: three dispatcher processes and two retry
//! processes share one RabbitMQ and one PostgreSQL with no other coordination. Every
//! process takes part, every delivery is made, and duplicates (at-least-once
//! redeliveries) are counted and reported.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{Env, authed, http_get};

/// The value of a counter (summed over its label sets) in Prometheus text.
fn counter(metrics: &str, name: &str, label: Option<&str>) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label.is_none_or(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn three_dispatchers_and_two_retry_processes_share_the_work() {
    const EVENTS: usize = 2000;
    let env = Env::new().await;
    let admin = env.admin_key().await;
    let front = env.serve("registry,ingest").await;
    let fast_retries = [("HOOKLINE_RETRY_POLL_INTERVAL_MS", "20")];
    let mut dispatchers = Vec::new();
    for _ in 0..3 {
        dispatchers.push(env.serve_with("dispatcher", &[]).await);
    }
    let mut retriers = Vec::new();
    for _ in 0..2 {
        retriers.push(env.serve_with("retry", &fast_retries).await);
    }

    let receiver = Receiver::start().await;
    let channel = tonic::transport::Channel::from_shared(front.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut registry = RegistryServiceClient::new(channel.clone());
    let tenant = registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    // Every fifth event fails once, so those deliveries also pass through a retry
    // process (rarely enough that the endpoint's circuit breaker stays closed).
    let url = receiver.endpoint("scale", Behavior::FailFirstOfEvery(5, 503));
    let created = registry
        .create_subscription(authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.clone(),
                    url,
                    retry_policy: Some(pb::RetryPolicy {
                        schedule: vec![prost_types::Duration {
                            seconds: 1,
                            nanos: 0,
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    receiver.set_secret("scale", &created.secret);

    let mut ingest = IngestServiceClient::new(channel);
    for chunk in 0..(EVENTS / 500) {
        let events = (0..500)
            .map(|i| pb::PublishRequest {
                tenant_id: tenant.clone(),
                event_type: "order.created".into(),
                payload: format!(r#"{{"n":{}}}"#, chunk * 500 + i).into_bytes(),
                ..Default::default()
            })
            .collect();
        ingest
            .publish_batch(authed(pb::PublishBatchRequest { events }, &admin))
            .await
            .unwrap();
    }

    let got = receiver
        .wait_for(
            "scale",
            Duration::from_secs(180),
            "every event delivered after its retry",
            |r| {
                let mut per_event: HashMap<String, usize> = HashMap::new();
                for req in r {
                    *per_event.entry(req.header("webhook-id")).or_default() += 1;
                }
                per_event.len() == EVENTS
                    && per_event.values().filter(|n| **n >= 2).count() >= EVENTS / 5
            },
        )
        .await;
    assert!(got.iter().all(|r| r.verified));
    let expected = EVENTS + EVENTS / 5;
    let duplicates = got.len().saturating_sub(expected);
    eprintln!(
        "{} requests for {EVENTS} events ({expected} expected): {duplicates} at-least-once duplicates",
        got.len()
    );

    for (i, d) in dispatchers.iter().enumerate() {
        let (_, metrics) = http_get(&d.admin, "/metrics").await;
        let made = counter(&metrics, "hookline_deliveries_total", None);
        eprintln!("dispatcher {i}: {made} outcomes recorded");
        assert!(made > 0.0, "dispatcher {i} took part:\n{metrics}");
    }
    for (i, r) in retriers.iter().enumerate() {
        let (_, metrics) = http_get(&r.admin, "/metrics").await;
        let queued = counter(&metrics, "hookline_retries_enqueued_total", None);
        eprintln!("retry process {i}: {queued} retries queued");
        assert!(queued > 0.0, "retry process {i} took part:\n{metrics}");
    }
    assert!(
        duplicates <= EVENTS / 100,
        "{duplicates} duplicates is more than at-least-once redelivery explains"
    );

    for server in dispatchers.into_iter().chain(retriers).chain([front]) {
        assert!(server.terminate().await.success());
    }
    env.finish().await;
}
