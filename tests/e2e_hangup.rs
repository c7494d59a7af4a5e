//! Clients that hang up: when callers drop their publish calls mid-flight (short
//! client-side timeouts under load), whatever was stored is still queued at once by the
//! server, not left to the outbox relay's grace period: every delivery arrives, exactly
//! once, and the relay re-publishes nothing.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_store::port::StoreHealth;
use support::receiver::{Behavior, Receiver};
use support::tenant::TenantServer;
use support::{Backend, Env, authed, http_get};

on_both_backends!(publishes_whose_callers_hang_up_are_queued_at_once);

/// Concurrent callers, each on a connection of its own.
const CALLERS: usize = 24;
/// Calls per caller.
const CALLS: usize = 25;
/// Events per call.
const EVENTS_PER_CALL: usize = 4;
/// How long deliveries may take to arrive. Deliveries a hang-up left to the relay arrive
/// too, after its grace period (10 s); the relay count then fails the test.
const WAIT: Duration = Duration::from_secs(90);

async fn publishes_whose_callers_hang_up_are_queued_at_once(backend: Backend) {
    let mut t = TenantServer::start(backend, &[]).await;
    let receiver = Receiver::start().await;
    let tenant = t.tenant.clone();
    t.subscribe_receiver(&tenant, &receiver, "hangup", Behavior::Ok)
        .await;

    let (answered, hung_up) = publish_and_hang_up(&t).await;
    eprintln!("{answered} calls answered, {hung_up} dropped by their callers");
    assert!(answered > 0, "some calls were answered");
    assert!(hung_up > 0, "some calls were dropped mid-flight");

    // What was stored, whoever waited for it: one delivery per event (fan-out 1).
    let stored = stored_events(&t).await;
    assert!(
        stored >= answered * EVENTS_PER_CALL,
        "{stored} events stored"
    );
    receiver
        .wait_for("hangup", WAIT, "a delivery of every stored event", |r| {
            distinct_events(r).len() >= stored
        })
        .await;
    // Nothing is left for the relay (once the outbox is empty it can never re-publish).
    wait_for_empty_outbox(&t.env).await;

    let (_, metrics) = http_get(&t.server.admin, "/metrics").await;
    let relayed = counter(&metrics, "hookline_outbox_relayed_total");
    assert_eq!(
        relayed, 0.0,
        "the relay re-published {relayed} deliveries that hung-up calls left behind"
    );
    let got = receiver.received("hangup");
    assert!(got.iter().all(|r| r.verified));
    let per_event = distinct_events(&got);
    let twice: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(
        per_event.len(),
        stored,
        "{} requests for {stored} events",
        got.len()
    );
    t.finish().await;
}

/// `CALLERS` callers publish at once. Every third call is waited for; the others are
/// dropped after a fraction (0.2 to 1.4) of the time the caller's last answered call
/// took, so many are dropped while the server stores or queues them, whatever the
/// machine's speed. Returns how many calls were answered and how many were dropped.
async fn publish_and_hang_up(t: &TenantServer) -> (usize, usize) {
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let channel = support::channel(&t.server).await;
        let (tenant, admin) = (t.tenant.clone(), t.admin.clone());
        callers.push(tokio::spawn(async move {
            let mut ingest = IngestServiceClient::new(channel);
            let (mut answered, mut hung_up) = (0, 0);
            let mut took = Duration::from_millis(20);
            for call in 0..CALLS {
                let events = (0..EVENTS_PER_CALL)
                    .map(|i| pb::PublishRequest {
                        tenant_id: tenant.clone(),
                        event_type: "order.placed".into(),
                        payload: format!(r#"{{"caller":{caller},"call":{call},"i":{i}}}"#)
                            .into_bytes(),
                        ..Default::default()
                    })
                    .collect();
                let patience = match call % 3 {
                    0 => Duration::from_secs(60),
                    _ => took.mul_f64(0.2 + ((caller + call) % 7) as f64 * 0.2),
                };
                let req = authed(pb::PublishBatchRequest { events }, &admin);
                let started = tokio::time::Instant::now();
                match tokio::time::timeout(patience, ingest.publish_batch(req)).await {
                    Ok(answer) => {
                        answer.expect("a publish the caller waited for succeeds");
                        took = started.elapsed();
                        answered += 1;
                    }
                    Err(_) => hung_up += 1,
                }
            }
            (answered, hung_up)
        }));
    }
    let mut totals = (0, 0);
    for caller in callers {
        let (a, h) = caller.await.expect("caller task");
        totals = (totals.0 + a, totals.1 + h);
    }
    totals
}

/// How many events the tenant has, read back with `ListEvents`.
async fn stored_events(t: &TenantServer) -> usize {
    let mut ingest = t.ingest.clone();
    let (mut count, mut token) = (0, String::new());
    loop {
        let page = ingest
            .list_events(authed(
                pb::ListEventsRequest {
                    tenant_id: t.tenant.clone(),
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                },
                &t.admin,
            ))
            .await
            .expect("list events")
            .into_inner();
        count += page.events.len();
        if page.next_page_token.is_empty() {
            return count;
        }
        token = page.next_page_token;
    }
}

/// Requests per `webhook-id` (the event's id).
fn distinct_events(received: &[support::receiver::Received]) -> HashMap<String, usize> {
    let mut per_event = HashMap::new();
    for r in received {
        *per_event.entry(r.header("webhook-id")).or_default() += 1;
    }
    per_event
}

/// Waits until the store's outbox has no entry left, read from the store beside the
/// server (the metrics gauge is refreshed only every few seconds).
async fn wait_for_empty_outbox(env: &Env) {
    let store: Arc<dyn StoreHealth> = match &env.db {
        Some(db) => Arc::new(
            hookline_store::PgStore::connect(db.url(), 1)
                .await
                .expect("connect to the test database"),
        ),
        None => Arc::new(
            hookline_store::SqliteStore::open(&env.data_dir.join("hookline.db"))
                .await
                .expect("open the embedded database"),
        ),
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let outbox = store.stats().await.expect("store statistics").outbox;
        if outbox == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{outbox} outbox entries left after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of a counter (summed over its label sets) in Prometheus text.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
