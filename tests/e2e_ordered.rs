//! Ordered delivery end to end (issue #11, part 2), on both backends: an ordered
//! subscription receives 1,000 events in publish order while its receiver fails the first
//! request of every 10th event and a dispatcher is killed with SIGKILL mid-run (the
//! distributed case runs two `--services dispatcher` processes, kills one and starts
//! another; the embedded case kills its one process and starts it again). Nothing is
//! lost, the order of first receipt is the publish order, and an unordered subscription
//! to the same events beside it finishes well before the ordered one.

#[macro_use]
mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Received, Receiver};
use support::{Backend, Env, Server, authed, channel, create_tenant};

on_both_backends!(ordered_delivery_keeps_publish_order_through_failures_and_a_sigkill);

const EVENTS: usize = 1000;
const BATCH: usize = 100;

/// Retries and relayed publishes come fast, so the test measures ordering, not waiting.
const FAST: [(&str, &str); 2] = [
    ("HOOKLINE_RETRY_POLL_INTERVAL_MS", "20"),
    ("HOOKLINE_RELAY_GRACE_MS", "1000"),
];

/// The processes of the test: the API (and, embedded, everything) and the dispatchers.
struct Cluster {
    front: Server,
    dispatchers: Vec<Server>,
}

impl Cluster {
    async fn start(env: &Env) -> Cluster {
        match env.backend {
            Backend::Distributed => {
                let front = env.serve_with("registry,ingest,retry", &FAST).await;
                let mut dispatchers = Vec::new();
                for _ in 0..2 {
                    dispatchers.push(env.serve_with("dispatcher", &FAST).await);
                }
                Cluster { front, dispatchers }
            }
            Backend::Embedded => Cluster {
                front: env.serve_with("all", &FAST).await,
                dispatchers: Vec::new(),
            },
        }
    }

    /// SIGKILLs a process that dispatches and starts a replacement.
    async fn kill_a_dispatcher(&mut self, env: &Env) {
        let victim = match env.backend {
            Backend::Distributed => &mut self.dispatchers[0].child,
            Backend::Embedded => &mut self.front.child,
        };
        victim.start_kill().expect("SIGKILL");
        victim.wait().await.expect("reap the killed process");
        match env.backend {
            Backend::Distributed => {
                self.dispatchers[0] = env.serve_with("dispatcher", &FAST).await;
            }
            Backend::Embedded => self.front = env.serve_with("all", &FAST).await,
        }
    }

    /// Makes the subscription unordered through UpdateSubscription, and checks that a
    /// value outside the enum is refused with the field named.
    async fn unorder(&self, admin: &str, id: &str) {
        let mut registry = RegistryServiceClient::new(channel(&self.front).await);
        let update = |ordering: i32| {
            authed(
                pb::UpdateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        id: id.to_string(),
                        ordering,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["ordering".into()],
                    }),
                },
                admin,
            )
        };
        let err = registry
            .update_subscription(update(7))
            .await
            .expect_err("7");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("subscription.ordering"),
            "{}",
            err.message()
        );
        let updated = registry
            .update_subscription(update(pb::Ordering::Unordered as i32))
            .await
            .expect("update")
            .into_inner();
        assert_eq!(updated.ordering, pb::Ordering::Unordered as i32);
    }

    async fn finish(self) {
        for server in self.dispatchers.into_iter().chain([self.front]) {
            assert!(server.terminate().await.success());
        }
    }
}

async fn subscribe(
    registry: &mut RegistryServiceClient<tonic::transport::Channel>,
    admin: &str,
    tenant: &str,
    url: String,
    ordering: pb::Ordering,
) -> (String, String) {
    let created = registry
        .create_subscription(authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.to_string(),
                    url,
                    ordering: ordering as i32,
                    // The first retry is immediate, the rest come soon.
                    retry_policy: Some(pb::RetryPolicy {
                        schedule: [0, 1, 1, 1, 1]
                            .into_iter()
                            .map(|seconds| prost_types::Duration { seconds, nanos: 0 })
                            .collect(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("create subscription")
        .into_inner();
    let sub = created.subscription.expect("subscription");
    assert_eq!(
        sub.ordering, ordering as i32,
        "ordering is stored and returned"
    );
    (sub.id, created.secret)
}

/// The event numbers (`{"n":…}`) in the order of their first receipt, and when the last
/// first receipt came.
fn first_receipts(got: &[Received]) -> (Vec<usize>, Option<Instant>) {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut last = None;
    for r in got {
        if seen.insert(r.header("webhook-id")) {
            let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json body");
            order.push(usize::try_from(body["n"].as_u64().expect("n")).expect("usize"));
            last = Some(r.at);
        }
    }
    (order, last)
}

fn distinct(got: &[Received]) -> usize {
    got.iter()
        .map(|r| r.header("webhook-id"))
        .collect::<HashSet<_>>()
        .len()
}

/// How many events were answered 200 (delivered).
fn delivered(got: &[Received]) -> usize {
    got.iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("webhook-id"))
        .collect::<HashSet<_>>()
        .len()
}

async fn ordered_delivery_keeps_publish_order_through_failures_and_a_sigkill(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let mut cluster = Cluster::start(&env).await;
    let api = channel(&cluster.front).await;
    let tenant = create_tenant(&api, &admin, "acme", None).await;
    let mut registry = RegistryServiceClient::new(api.clone());
    let receiver = Receiver::start().await;
    let mut ordered_id = String::new();
    for (name, ordering) in [
        ("ordered", pb::Ordering::Ordered),
        ("unordered", pb::Ordering::Unordered),
    ] {
        // The first request of every 10th event fails once (500).
        let url = receiver.endpoint(name, Behavior::FailFirstOfEvery(10, 500));
        let (id, secret) = subscribe(&mut registry, &admin, &tenant, url, ordering).await;
        receiver.set_secret(name, &secret);
        if ordering == pb::Ordering::Ordered {
            ordered_id = id;
        }
    }

    let started = Instant::now();
    let mut ingest = IngestServiceClient::new(api);
    for chunk in 0..EVENTS / BATCH {
        let events = (0..BATCH)
            .map(|i| pb::PublishRequest {
                tenant_id: tenant.clone(),
                event_type: "ledger.entry".into(),
                payload: format!(r#"{{"n":{}}}"#, chunk * BATCH + i).into_bytes(),
                ..Default::default()
            })
            .collect();
        let res = ingest
            .publish_batch(authed(pb::PublishBatchRequest { events }, &admin))
            .await
            .expect("publish")
            .into_inner();
        assert_eq!(res.results.len(), BATCH);
    }

    // Mid-run: a third of the ordered deliveries made.
    receiver
        .wait_for(
            "ordered",
            Duration::from_secs(300),
            "a third delivered",
            |r| distinct(r) >= EVENTS / 3,
        )
        .await;
    cluster.kill_a_dispatcher(&env).await;
    let killed_at = distinct(&receiver.received("ordered"));
    assert!(killed_at < EVENTS, "the kill came mid-run ({killed_at})");

    let mut done = HashMap::new();
    for name in ["unordered", "ordered"] {
        let got = receiver
            .wait_for(name, Duration::from_secs(600), "every event", |r| {
                delivered(r) == EVENTS
            })
            .await;
        assert!(got.iter().all(|r| r.verified), "{name}: signed");
        let (order, last) = first_receipts(&got);
        let took = last.expect("receipts").duration_since(started);
        let failed = got.iter().filter(|r| r.status == 500).count();
        eprintln!(
            "{backend:?} {name}: {EVENTS} events in {took:?} ({:.0}/s), {} requests, {failed} answered 500",
            EVENTS as f64 / took.as_secs_f64(),
            got.len()
        );
        assert!(
            failed >= EVENTS / 10,
            "{name}: every 10th failed once ({failed})"
        );
        if name == "ordered" {
            assert_eq!(
                order,
                (0..EVENTS).collect::<Vec<_>>(),
                "first receipts in publish order"
            );
        }
        done.insert(name, took);
    }
    eprintln!("{backend:?}: SIGKILL after {killed_at} ordered deliveries");
    assert!(
        done["unordered"] * 2 <= done["ordered"],
        "the unordered subscription is not slowed by the ordered one: {done:?}"
    );
    cluster.unorder(&admin, &ordered_id).await;
    cluster.finish().await;
    env.finish().await;
}
