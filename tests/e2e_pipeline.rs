//! The delivery pipeline end to end: the real `hookline serve` as a child process on
//! real PostgreSQL and RabbitMQ, publishing over gRPC, and a real local HTTP receiver
//! that verifies every request with the `standardwebhooks` crate.

#[macro_use]
mod support;

use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::delivery_service_client::DeliveryServiceClient;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, Server, authed};
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

/// A running pipeline, an admin key, a tenant and a receiver.
struct Pipeline {
    env: Env,
    server: Server,
    receiver: Receiver,
    admin: String,
    tenant: String,
    registry: RegistryServiceClient<Channel>,
    ingest: IngestServiceClient<Channel>,
    deliveries: DeliveryServiceClient<Channel>,
}

impl Pipeline {
    async fn start(backend: Backend, settings: &[(&str, &str)]) -> Pipeline {
        let env = Env::with(backend).await;
        let admin = env.admin_key().await;
        let mut all = vec![
            ("HOOKLINE_RETRY_POLL_INTERVAL_MS", "50"),
            ("HOOKLINE_REQUEST_TIMEOUT_MS", "2000"),
        ];
        all.extend_from_slice(settings);
        let server = env.serve_with("all", &all).await;
        let channel = Channel::from_shared(server.grpc.clone())
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
        Pipeline {
            env,
            server,
            receiver: Receiver::start().await,
            admin,
            tenant,
            registry,
            ingest: IngestServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            deliveries: DeliveryServiceClient::new(channel),
        }
    }

    async fn finish(self) {
        let status = self.server.terminate().await;
        assert!(status.success(), "hookline exited with {status}");
        self.env.finish().await;
    }

    /// A subscription to receiver endpoint `name`; returns its id.
    async fn subscribe(
        &mut self,
        name: &str,
        behavior: Behavior,
        filters: &[&str],
        schedule_ms: &[u64],
    ) -> String {
        let url = self.receiver.endpoint(name, behavior);
        let res = self
            .registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: self.tenant.clone(),
                        url,
                        event_types: filters.iter().map(|s| s.to_string()).collect(),
                        retry_policy: (!schedule_ms.is_empty()).then(|| pb::RetryPolicy {
                            schedule: schedule_ms
                                .iter()
                                .map(|ms| prost_types::Duration {
                                    seconds: (*ms / 1000) as i64,
                                    nanos: ((*ms % 1000) * 1_000_000) as i32,
                                })
                                .collect(),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        self.receiver.set_secret(name, &res.secret);
        res.subscription.unwrap().id
    }

    fn event(&self, event_type: &str, payload: &[u8]) -> pb::PublishRequest {
        pb::PublishRequest {
            tenant_id: self.tenant.clone(),
            event_type: event_type.into(),
            payload: payload.to_vec(),
            ..Default::default()
        }
    }

    async fn publish(
        &mut self,
        req: pb::PublishRequest,
    ) -> Result<pb::PublishResponse, tonic::Status> {
        let admin = self.admin.clone();
        self.ingest
            .publish(authed(req, &admin))
            .await
            .map(|r| r.into_inner())
    }

    /// The one delivery of `event_id` to `subscription_id`.
    async fn delivery_of(&mut self, event_id: &str, subscription_id: &str) -> pb::Delivery {
        let admin = self.admin.clone();
        let list = self
            .deliveries
            .list_deliveries(authed(
                pb::ListDeliveriesRequest {
                    event_id: event_id.into(),
                    subscription_id: subscription_id.into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        assert_eq!(list.len(), 1, "one delivery per event and subscription");
        list.into_iter().next().unwrap()
    }

    async fn get_delivery(&mut self, id: &str) -> pb::GetDeliveryResponse {
        let admin = self.admin.clone();
        self.deliveries
            .get_delivery(authed(
                pb::GetDeliveryRequest {
                    delivery_id: id.into(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the delivery's status is `status`; returns it with its attempts.
    async fn wait_status(
        &mut self,
        id: &str,
        status: pb::DeliveryStatus,
    ) -> pb::GetDeliveryResponse {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.get_delivery(id).await;
            if got.delivery.as_ref().unwrap().status == status as i32 {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "delivery {id} did not reach {status:?}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn event_count(&mut self) -> usize {
        let admin = self.admin.clone();
        self.ingest
            .list_events(authed(
                pb::ListEventsRequest {
                    tenant_id: self.tenant.clone(),
                    page_size: 1000,
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .events
            .len()
    }
}

async fn a_publish_reaches_its_subscriber_signed_and_byte_exact(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    p.subscribe("a", Behavior::Ok, &[], &[]).await;
    // Odd spacing, key order and an integer beyond f64 precision must survive untouched.
    let payload = br#"{ "z": 1,  "big": 123456789012345678901234567890, "a" : [ "x" ] }"#;
    let published = p.publish(p.event("invoice.paid", payload)).await.unwrap();
    assert!(published.event_id.starts_with("evt_"));
    assert_eq!(published.deliveries_created, 1);

    let got = p
        .receiver
        .wait_for("a", WAIT, "the delivery", |r| !r.is_empty())
        .await;
    let req = &got[0];
    assert_eq!(req.body, payload, "payload bytes exactly as published");
    assert!(req.verified, "standardwebhooks verifies the signature");
    assert_eq!(req.header("webhook-id"), published.event_id);
    assert_eq!(req.header("content-type"), "application/json");
    assert!(
        req.header("user-agent").contains("Hookline"),
        "{}",
        req.header("user-agent")
    );

    let event = p
        .ingest
        .get_event(authed(
            pb::GetEventRequest {
                event_id: published.event_id.clone(),
            },
            &p.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(event.payload, payload);
    p.finish().await;
}

async fn fan_out_reaches_exactly_the_matching_subscriptions(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    p.subscribe("exact", Behavior::Ok, &["invoice.paid"], &[])
        .await;
    p.subscribe("wild", Behavior::Ok, &["invoice.*"], &[]).await;
    p.subscribe("all", Behavior::Ok, &[], &[]).await;
    p.subscribe("users", Behavior::Ok, &["user.*"], &[]).await;
    p.subscribe("other", Behavior::Ok, &["invoice.voided"], &[])
        .await;

    let published = p.publish(p.event("invoice.paid", b"{}")).await.unwrap();
    assert_eq!(published.deliveries_created, 3);
    for name in ["exact", "wild", "all"] {
        let got = p
            .receiver
            .wait_for(name, WAIT, "the fan-out", |r| !r.is_empty())
            .await;
        assert_eq!(
            got[0].header("webhook-id"),
            published.event_id,
            "same webhook-id for every subscription"
        );
        assert!(got[0].verified);
    }
    // A second event that only `all` and `users` want; once `all` has it, the first
    // event's deliveries are long settled, so the others must have nothing more.
    let second = p.publish(p.event("user.created", b"{}")).await.unwrap();
    assert_eq!(second.deliveries_created, 2);
    p.receiver
        .wait_for("all", WAIT, "the second event", |r| r.len() == 2)
        .await;
    p.receiver
        .wait_for("users", WAIT, "the user event", |r| r.len() == 1)
        .await;
    assert_eq!(p.receiver.received("exact").len(), 1);
    assert_eq!(p.receiver.received("wild").len(), 1);
    assert!(p.receiver.received("other").is_empty());
    p.finish().await;
}

async fn a_batch_of_1000_events_is_delivered_in_full(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    p.subscribe("bulk", Behavior::Ok, &[], &[]).await;
    let events: Vec<_> = (0..1000)
        .map(|i| p.event("order.created", format!("{{\"n\":{i}}}").as_bytes()))
        .collect();
    let admin = p.admin.clone();
    let res = p
        .ingest
        .publish_batch(authed(pb::PublishBatchRequest { events }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.results.len(), 1000);
    assert!(
        res.results
            .iter()
            .all(|r| r.deliveries_created == 1 && !r.duplicate)
    );
    let got = p
        .receiver
        .wait_for("bulk", Duration::from_secs(120), "1000 deliveries", |r| {
            r.iter()
                .map(|r| r.header("webhook-id"))
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= 1000
        })
        .await;
    assert!(got.iter().all(|r| r.verified));
    let ids: std::collections::HashSet<_> = got.iter().map(|r| r.header("webhook-id")).collect();
    let published: std::collections::HashSet<_> =
        res.results.iter().map(|r| r.event_id.clone()).collect();
    assert_eq!(ids, published);
    p.finish().await;
}

async fn a_receiver_failing_twice_gets_three_attempts_and_one_success(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    let sub = p
        .subscribe("flaky", Behavior::FailTimes(2, 500), &[], &[100, 100, 100])
        .await;
    let published = p
        .publish(p.event("invoice.paid", br#"{"k":1}"#))
        .await
        .unwrap();
    let delivery = p.delivery_of(&published.event_id, &sub).await;
    let got = p
        .wait_status(&delivery.id, pb::DeliveryStatus::Succeeded)
        .await;
    let attempts = got.attempts;
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(
        attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    assert_eq!(
        attempts
            .iter()
            .map(|a| a.attempt_number)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(String::from_utf8_lossy(&attempts[0].response_excerpt).contains("receiver says 500"));
    assert_eq!(got.delivery.unwrap().attempt_count, 3);
    let received = p.receiver.received("flaky");
    assert_eq!(received.len(), 3);
    assert!(
        received
            .iter()
            .all(|r| r.verified && r.header("webhook-id") == published.event_id)
    );
    p.finish().await;
}

async fn a_spent_schedule_fails_the_delivery_and_retry_or_replay_delivers_it(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    let sub = p
        .subscribe("down", Behavior::Always(503), &[], &[50, 50])
        .await;
    let first = p
        .publish(p.event("invoice.paid", br#"{"n":1}"#))
        .await
        .unwrap();
    let second = p
        .publish(p.event("invoice.paid", br#"{"n":2}"#))
        .await
        .unwrap();
    let d1 = p.delivery_of(&first.event_id, &sub).await;
    let d2 = p.delivery_of(&second.event_id, &sub).await;
    let failed = p.wait_status(&d1.id, pb::DeliveryStatus::Failed).await;
    assert_eq!(
        failed.attempts.len(),
        3,
        "first attempt + a schedule of two retries"
    );
    assert!(failed.delivery.unwrap().last_error.contains("schedule"));
    p.wait_status(&d2.id, pb::DeliveryStatus::Failed).await;

    // The receiver recovers: a manual retry delivers one, a replay the rest.
    p.receiver.set_behavior("down", Behavior::Ok);
    let admin = p.admin.clone();
    p.deliveries
        .retry_delivery(authed(
            pb::RetryDeliveryRequest {
                delivery_id: d1.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let ok = p.wait_status(&d1.id, pb::DeliveryStatus::Succeeded).await;
    assert_eq!(ok.attempts.len(), 4);
    let replayed = p
        .deliveries
        .replay_failed(authed(
            pb::ReplayFailedRequest {
                subscription_id: sub.clone(),
                since: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                until: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    p.wait_status(&d2.id, pb::DeliveryStatus::Succeeded).await;
    p.finish().await;
}

async fn a_hanging_receiver_is_recorded_as_a_timeout_and_retried(backend: Backend) {
    let mut p = Pipeline::start(backend, &[("HOOKLINE_REQUEST_TIMEOUT_MS", "500")]).await;
    let sub = p
        .subscribe("slow", Behavior::HangTimes(1), &[], &[100])
        .await;
    let published = p.publish(p.event("invoice.paid", b"{}")).await.unwrap();
    let d = p.delivery_of(&published.event_id, &sub).await;
    let got = p.wait_status(&d.id, pb::DeliveryStatus::Succeeded).await;
    assert_eq!(got.attempts.len(), 2);
    assert_eq!(got.attempts[0].error_class, pb::ErrorClass::Timeout as i32);
    assert_eq!(got.attempts[0].status_code, 0);
    assert_eq!(got.attempts[1].status_code, 200);
    p.finish().await;
}

async fn gone_disables_the_subscription_and_retry_after_delays_the_next_attempt(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    let gone = p
        .subscribe("gone", Behavior::Always(410), &["a.gone"], &[50, 50])
        .await;
    let busy = p
        .subscribe("busy", Behavior::TooManyTimes(1, 2), &["a.busy"], &[50])
        .await;

    let e1 = p.publish(p.event("a.gone", b"{}")).await.unwrap();
    let d1 = p.delivery_of(&e1.event_id, &gone).await;
    let failed = p.wait_status(&d1.id, pb::DeliveryStatus::Failed).await;
    assert_eq!(failed.attempts.len(), 1, "410 is final");
    let admin = p.admin.clone();
    let sub = p
        .registry
        .get_subscription(authed(
            pb::GetSubscriptionRequest {
                subscription_id: gone.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sub.state, pb::SubscriptionState::Disabled as i32);
    assert!(
        sub.disabled_reason.contains("410"),
        "{}",
        sub.disabled_reason
    );
    // Disabled now: the next event does not match it at all.
    let later = p.publish(p.event("a.gone", b"{}")).await.unwrap();
    assert_eq!(later.deliveries_created, 0);

    let e2 = p.publish(p.event("a.busy", b"{}")).await.unwrap();
    let d2 = p.delivery_of(&e2.event_id, &busy).await;
    p.wait_status(&d2.id, pb::DeliveryStatus::Succeeded).await;
    let got = p.receiver.received("busy");
    assert_eq!(got.len(), 2);
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After: 2 honoured, gap was {gap:?}"
    );
    p.finish().await;
}

async fn a_repeated_idempotent_publish_creates_one_event_also_when_racing(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    let sub_a = p.subscribe("ia", Behavior::Ok, &[], &[]).await;
    let sub_b = p.subscribe("ib", Behavior::Ok, &[], &[]).await;
    let mut req = p.event("invoice.paid", b"{}");
    req.idempotency_key = "order-42".into();
    let first = p.publish(req.clone()).await.unwrap();
    let again = p.publish(req.clone()).await.unwrap();
    assert_eq!(again.event_id, first.event_id);
    assert!(again.duplicate);
    assert_eq!(again.deliveries_created, 2);

    let mut racing = req.clone();
    racing.idempotency_key = "order-43".into();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let mut ingest = p.ingest.clone();
        let r = authed(racing.clone(), &p.admin);
        handles.push(tokio::spawn(async move {
            ingest.publish(r).await.map(|r| r.into_inner())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for h in handles {
        let r = h.await.unwrap().unwrap();
        ids.insert(r.event_id.clone());
        if !r.duplicate {
            created += 1;
        }
    }
    assert_eq!(ids.len(), 1, "one event for the racing publishes");
    assert_eq!(created, 1);
    assert_eq!(p.event_count().await, 2);
    let raced = ids.into_iter().next().unwrap();
    for (name, sub) in [("ia", &sub_a), ("ib", &sub_b)] {
        p.delivery_of(&first.event_id, sub).await;
        p.delivery_of(&raced, sub).await;
        p.receiver
            .wait_for(name, WAIT, "two events", |r| r.len() >= 2)
            .await;
    }
    p.finish().await;
}

async fn bad_publishes_are_refused_clearly_and_nothing_is_stored_or_delivered(backend: Backend) {
    let mut p = Pipeline::start(backend, &[("HOOKLINE_MAX_PAYLOAD_BYTES", "1024")]).await;
    p.subscribe("never", Behavior::Ok, &[], &[]).await;
    let cases: Vec<(pb::PublishRequest, Code, &str)> = vec![
        (
            p.event("invoice.paid", b"{not json"),
            Code::InvalidArgument,
            "payload: is not valid JSON",
        ),
        (
            p.event(
                "invoice.paid",
                format!("\"{}\"", "x".repeat(2000)).as_bytes(),
            ),
            Code::InvalidArgument,
            "payload: is 2,002 bytes; the limit is 1,024",
        ),
        (
            p.event("invoice..paid", b"{}"),
            Code::InvalidArgument,
            "event_type",
        ),
        (
            p.event("invoice.*", b"{}"),
            Code::InvalidArgument,
            "event_type",
        ),
        (
            pb::PublishRequest {
                tenant_id: hookline_core::Id::new(hookline_core::IdKind::Tenant).into_string(),
                ..p.event("invoice.paid", b"{}")
            },
            Code::NotFound,
            "not found",
        ),
    ];
    for (req, code, msg) in cases {
        let err = p.publish(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(msg),
            "{:?} should contain {msg:?}",
            err.message()
        );
    }
    // No key, and a key of another tenant.
    let err = p
        .ingest
        .publish(tonic::Request::new(p.event("invoice.paid", b"{}")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let admin = p.admin.clone();
    let other = p
        .registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "other".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    let foreign = p
        .registry
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                name: "other".into(),
                tenant_id: other,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let err = p
        .ingest
        .publish(authed(p.event("invoice.paid", b"{}"), &foreign))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A batch with one bad event stores none of it.
    let batch = vec![p.event("a.b", b"{}"), p.event("a.b", b"nope")];
    let err = p
        .ingest
        .publish_batch(authed(pb::PublishBatchRequest { events: batch }, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("events[1].payload"),
        "{}",
        err.message()
    );

    assert_eq!(p.event_count().await, 0, "nothing stored");
    // One good publish proves the pipeline runs; it must be the only thing received.
    p.publish(p.event("invoice.paid", b"{}")).await.unwrap();
    p.receiver
        .wait_for("never", WAIT, "the good event", |r| !r.is_empty())
        .await;
    assert_eq!(p.receiver.received("never").len(), 1);
    p.finish().await;
}

/// Runs a client command of the binary against the pipeline; returns stdout.
async fn cli(p: &Pipeline, args: &[&str]) -> String {
    let out = tokio::process::Command::new(support::BIN)
        .args(args)
        .env("HOOKLINE_SERVER", &p.server.grpc)
        .env("HOOKLINE_TOKEN", &p.admin)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "hookline {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn the_cli_publishes_tails_and_shows_every_attempt(backend: Backend) {
    use tokio::io::AsyncBufReadExt;
    let p = Pipeline::start(backend, &[]).await;
    let url = p.receiver.endpoint("cli", Behavior::FailTimes(1, 502));
    let created: serde_json::Value = serde_json::from_str(
        &cli(
            &p,
            &[
                "subscriptions",
                "create",
                "--tenant",
                &p.tenant,
                "--url",
                &url,
                "--event-type",
                "invoice.*",
                "--retry-schedule-ms",
                "1500",
                "--json",
            ],
        )
        .await,
    )
    .unwrap();
    p.receiver
        .set_secret("cli", created["secret"].as_str().unwrap());
    let listed = cli(&p, &["subscriptions", "list", "--tenant", &p.tenant]).await;
    assert!(listed.contains(created["id"].as_str().unwrap()), "{listed}");

    let mut tail = tokio::process::Command::new(support::BIN)
        .args(["tail", "--tenant", &p.tenant, "--json"])
        .env("HOOKLINE_SERVER", &p.server.grpc)
        .env("HOOKLINE_TOKEN", &p.admin)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();

    let published = cli(
        &p,
        &[
            "publish",
            "--tenant",
            &p.tenant,
            "--type",
            "invoice.paid",
            "--data",
            r#"{"amount":42}"#,
        ],
    )
    .await;
    let event_id = published.split_whitespace().next().unwrap().to_string();
    assert!(event_id.starts_with("evt_"), "{published}");

    // tail shows the delivery as it changes: retrying (for the 1.5 s until its retry),
    // then succeeded.
    let mut statuses = Vec::new();
    let delivery_id = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("tail keeps running");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["event_id"] != event_id.as_str() {
                continue;
            }
            statuses.push(v["status"].as_str().unwrap().to_string());
            if v["status"] == "succeeded" {
                return v["id"].as_str().unwrap().to_string();
            }
        }
    })
    .await
    .expect("tail shows the success");
    assert!(statuses.contains(&"retrying".to_string()), "{statuses:?}");
    let _ = tail.kill().await;

    let got: serde_json::Value =
        serde_json::from_str(&cli(&p, &["deliveries", "get", &delivery_id, "--json"]).await)
            .unwrap();
    let codes: Vec<u64> = got["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![502, 200]);
    let table = cli(&p, &["deliveries", "get", &delivery_id]).await;
    assert!(
        table.contains("succeeded") && table.contains("502"),
        "{table}"
    );
    let list = cli(
        &p,
        &[
            "deliveries",
            "list",
            "--tenant",
            &p.tenant,
            "--status",
            "succeeded",
        ],
    )
    .await;
    assert!(list.contains(&delivery_id), "{list}");
    p.finish().await;
}

async fn a_delivery_committed_but_never_queued_is_relayed(backend: Backend) {
    use hookline_core::{Id, IdKind};
    use hookline_store::port::{InsertOutcome, NewEvent};
    let mut p = Pipeline::start(backend, &[("HOOKLINE_RELAY_GRACE_MS", "200")]).await;
    let sub = p.subscribe("stranded", Behavior::Ok, &[], &[]).await;
    // What a crash between the commit and the queue publish leaves behind: the event
    // and its delivery in the database, and nothing in the queue.
    let store = p.env.event_store().await;
    let event_id = Id::new(IdKind::Event);
    let outcome = store
        .insert_events(&[NewEvent {
            event: hookline_core::model::Event {
                id: event_id.clone(),
                tenant_id: Id::parse(IdKind::Tenant, "tenant", &p.tenant).unwrap(),
                event_type: "invoice.paid".into(),
                payload: br#"{"stranded":true}"#.to_vec(),
                channels: vec![],
                idempotency_key: None,
                created_at: chrono::Utc::now(),
            },
            subscription_ids: vec![Id::parse(IdKind::Subscription, "sub", &sub).unwrap()],
            traceparent: None,
        }])
        .await
        .unwrap();
    assert!(matches!(&outcome[0], InsertOutcome::Created { jobs, .. } if jobs.len() == 1));
    drop(store);

    let got = p
        .receiver
        .wait_for("stranded", WAIT, "the relayed delivery", |r| !r.is_empty())
        .await;
    assert_eq!(got[0].header("webhook-id"), event_id.as_str());
    assert!(got[0].verified);
    p.finish().await;
}

/// Well under the caches' TTLs (ingest 30 s, dispatcher 60 s): what arrives within it
/// came through the registry change stream.
const CHANGE_WAIT: Duration = Duration::from_secs(10);

/// A subscription change reaches ingest's subscription cache and the dispatcher's
/// endpoint cache through the process's registry change stream at once, not when the
/// cached entries expire.
async fn a_subscription_change_reaches_the_caches_through_the_stream(backend: Backend) {
    let mut p = Pipeline::start(backend, &[]).await;
    let first = p.subscribe("before", Behavior::Ok, &[], &[]).await;
    // Warm both caches: ingest's entry of the tenant, the dispatcher's of `first`.
    p.publish(p.event("order.placed", b"{}")).await.unwrap();
    p.receiver
        .wait_for("before", WAIT, "the first delivery", |r| r.len() == 1)
        .await;

    // Ingest: a subscription added after the tenant was cached is matched.
    p.subscribe("added", Behavior::Ok, &[], &[]).await;
    let deadline = tokio::time::Instant::now() + CHANGE_WAIT;
    loop {
        let published = p.publish(p.event("order.placed", b"{}")).await.unwrap();
        if published.deliveries_created == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest still matches only the cached subscription after {CHANGE_WAIT:?}"
        );
    }

    // Dispatcher: `first` moved to another URL; the next deliveries go there.
    let moved = p.receiver.endpoint("moved", Behavior::Ok);
    let admin = p.admin.clone();
    p.registry
        .update_subscription(authed(
            pb::UpdateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    id: first,
                    url: moved,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["url".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + CHANGE_WAIT;
    loop {
        let event_id = p
            .publish(p.event("order.placed", b"{}"))
            .await
            .unwrap()
            .event_id;
        let arrived = |r: &[support::receiver::Received]| {
            r.iter().any(|r| r.header("webhook-id") == event_id)
        };
        // Each event is delivered to `first` once, at the old URL or the new one.
        let at = tokio::time::Instant::now() + WAIT;
        while !arrived(&p.receiver.received("before")) && !arrived(&p.receiver.received("moved")) {
            assert!(
                tokio::time::Instant::now() < at,
                "event {event_id} was not delivered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if arrived(&p.receiver.received("moved")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dispatcher still delivers to the cached URL after {CHANGE_WAIT:?}"
        );
    }
    p.finish().await;
}

on_both_backends!(
    a_publish_reaches_its_subscriber_signed_and_byte_exact,
    fan_out_reaches_exactly_the_matching_subscriptions,
    a_batch_of_1000_events_is_delivered_in_full,
    a_receiver_failing_twice_gets_three_attempts_and_one_success,
    a_spent_schedule_fails_the_delivery_and_retry_or_replay_delivers_it,
    a_hanging_receiver_is_recorded_as_a_timeout_and_retried,
    gone_disables_the_subscription_and_retry_after_delays_the_next_attempt,
    a_repeated_idempotent_publish_creates_one_event_also_when_racing,
    bad_publishes_are_refused_clearly_and_nothing_is_stored_or_delivered,
    the_cli_publishes_tails_and_shows_every_attempt,
    a_delivery_committed_but_never_queued_is_relayed,
    a_subscription_change_reaches_the_caches_through_the_stream,
);
