//! Fair delivery end to end (real binary, both backends): a noisy neighbour's backlog
//! does not delay another tenant. Tenant A queues thousands of deliveries to a healthy
//! but slowish receiver (the dispatcher's concurrency is small, so A's backlog drains
//! for many seconds); tenant B then publishes a few events, which must arrive within a
//! bound far below the time A's backlog takes, while most of A's are still queued.
//! Without shard queues and fair permits B's events wait behind all of A's.

#[macro_use]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use hookline_proto::v1 as pb;
use support::receiver::{Behavior, Receiver};
use support::tenant::TenantServer;
use support::{Backend, authed, create_tenant};

/// A's deliveries: at 8 in flight × 40 ms each, about 20 s of backlog.
const A_EVENTS: usize = 4000;
const B_EVENTS: usize = 20;
/// B's latency bound, publish to receiver: generous for a loaded CI machine, yet far
/// below the ~20 s B would wait behind A.
const B_MAX_LATENCY: Duration = Duration::from_secs(2);
/// Shards per kind; the servers run with this (the default).
const SHARDS: u16 = 16;

const SETTINGS: &[(&str, &str)] = &[
    ("HOOKLINE_DISPATCHER_CONCURRENCY", "8"),
    ("HOOKLINE_DISPATCHER_SHARD_PREFETCH", "16"),
    ("HOOKLINE_QUOTA_EVENTS_PER_SECOND", "100000"),
];

fn event(tenant: &str, n: usize) -> pb::PublishRequest {
    pb::PublishRequest {
        tenant_id: tenant.to_owned(),
        event_type: "order.created".into(),
        payload: format!("{{\"n\":{n}}}").into_bytes(),
        ..Default::default()
    }
}

/// A tenant whose hand of shards is not exactly A's. Tenant ids are random; with hands
/// of 2 out of 16 shards two tenants share a whole hand once in 120 (then they share
/// their capacity, by design), so a B that drew A's hand is replaced by a new tenant.
async fn tenant_b(t: &TenantServer, a: &str) -> String {
    let hand = |id: &str| -> BTreeSet<u16> {
        hookline_broker::shards::hand(id, 1, SHARDS)
            .into_iter()
            .collect()
    };
    let channel = support::channel(&t.server).await;
    for attempt in 0..5 {
        let b = create_tenant(&channel, &t.admin, &format!("quiet{attempt}"), None).await;
        if hand(&b) != hand(a) {
            return b;
        }
    }
    panic!("five random tenants all drew tenant A's hand");
}

async fn a_backlog_does_not_delay_another_tenant(backend: Backend) {
    let mut t = TenantServer::start(backend, SETTINGS).await;
    let receiver = Receiver::start().await;
    let a = t.tenant.clone();
    let b = tenant_b(&t, &a).await;
    t.subscribe_receiver(&a, &receiver, "noisy", Behavior::Slow(40))
        .await;
    t.subscribe_receiver(&b, &receiver, "quiet", Behavior::Slow(40))
        .await;

    for chunk in (0..A_EVENTS).collect::<Vec<_>>().chunks(1000) {
        let events = chunk.iter().map(|n| event(&a, *n)).collect();
        let res = t
            .ingest
            .publish_batch(authed(pb::PublishBatchRequest { events }, &t.admin))
            .await
            .expect("publish A's burst")
            .into_inner();
        assert!(res.results.iter().all(|r| r.deliveries_created == 1));
    }

    let mut published_at = HashMap::new();
    for n in 0..B_EVENTS {
        let started = Instant::now();
        let res = t
            .ingest
            .publish(authed(event(&b, n), &t.admin))
            .await
            .expect("publish B's event")
            .into_inner();
        published_at.insert(res.event_id, started);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = receiver
        .wait_for("quiet", Duration::from_secs(60), "B's events", |r| {
            r.iter()
                .map(|r| r.header("webhook-id"))
                .collect::<BTreeSet<_>>()
                .len()
                >= B_EVENTS
        })
        .await;
    let a_done = receiver.received("noisy").len();

    let mut latencies = Vec::new();
    for r in &got {
        if let Some(start) = published_at.get(&r.header("webhook-id")) {
            latencies.push(r.at.saturating_duration_since(*start));
        }
    }
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "B latency p50 {:?} max {max:?}; A delivered {a_done} of {A_EVENTS} by then",
        latencies[latencies.len() / 2]
    );
    assert!(
        a_done < A_EVENTS / 2,
        "A's backlog must still be mostly queued when B's events arrive ({a_done} of {A_EVENTS} delivered): the test would prove nothing"
    );
    assert!(
        max <= B_MAX_LATENCY,
        "B's events waited behind A's backlog: max latency {max:?} (bound {B_MAX_LATENCY:?}); {latencies:?}"
    );
    t.finish().await;
}

on_both_backends!(a_backlog_does_not_delay_another_tenant);
