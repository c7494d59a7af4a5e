//! Tenant quotas against the real binary, on both backends: subscriptions per tenant (also
//! under 1,100 concurrent creates), deliveries per event and events per second, each
//! refused with RESOURCE_EXHAUSTED naming the quota, with nothing stored; overrides per
//! tenant set by admins only.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::{Backend, Env, Server, authed};
use tonic::Code;
use tonic::transport::Channel;

struct Quotas {
    env: Env,
    server: Server,
    admin: String,
    channel: Channel,
    registry: RegistryServiceClient<Channel>,
    ingest: IngestServiceClient<Channel>,
}

impl Quotas {
    async fn start(backend: Backend, settings: &[(&str, &str)]) -> Self {
        let env = Env::with(backend).await;
        let admin = env.admin_key().await;
        let server = env.serve_with("all", settings).await;
        let channel = support::channel(&server).await;
        Quotas {
            env,
            server,
            admin,
            registry: RegistryServiceClient::new(channel.clone()),
            ingest: IngestServiceClient::new(channel.clone()),
            channel,
        }
    }

    async fn finish(self) {
        let status = self.server.terminate().await;
        assert!(status.success(), "hookline exited with {status}");
        self.env.finish().await;
    }

    async fn tenant(&mut self, quotas: Option<pb::TenantQuotas>) -> String {
        support::create_tenant(&self.channel, &self.admin, "acme", quotas).await
    }

    /// `UpdateTenant` with new quotas, as the holder of `token`.
    async fn set_quotas(
        &mut self,
        tenant: &str,
        quotas: Option<pb::TenantQuotas>,
        token: &str,
    ) -> Result<pb::Tenant, tonic::Status> {
        self.registry
            .update_tenant(authed(
                pb::UpdateTenantRequest {
                    tenant_id: tenant.into(),
                    quotas,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn subscribe(&mut self, tenant: &str, disabled: bool) -> Result<(), tonic::Status> {
        create_subscription(self.registry.clone(), &self.admin, tenant, disabled).await
    }

    async fn count_subscriptions(&mut self, tenant: &str) -> usize {
        let (mut n, mut token) = (0, String::new());
        loop {
            let page = self
                .registry
                .list_subscriptions(authed(
                    pb::ListSubscriptionsRequest {
                        tenant_id: tenant.into(),
                        page_size: 1000,
                        page_token: token,
                    },
                    &self.admin,
                ))
                .await
                .unwrap()
                .into_inner();
            n += page.subscriptions.len();
            if page.next_page_token.is_empty() {
                return n;
            }
            token = page.next_page_token;
        }
    }

    async fn publish(&mut self, tenant: &str, events: usize) -> Result<(), tonic::Status> {
        let events = (0..events).map(|_| event(tenant)).collect();
        self.ingest
            .publish_batch(authed(pb::PublishBatchRequest { events }, &self.admin))
            .await
            .map(|_| ())
    }

    async fn count_events(&mut self, tenant: &str) -> usize {
        self.ingest
            .list_events(authed(
                pb::ListEventsRequest {
                    tenant_id: tenant.into(),
                    page_size: 1000,
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .events
            .len()
    }
}

/// A subscription to a host that never resolves (`.invalid`), so nothing is delivered.
async fn create_subscription(
    mut client: RegistryServiceClient<Channel>,
    admin: &str,
    tenant: &str,
    disabled: bool,
) -> Result<(), tonic::Status> {
    client
        .create_subscription(authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.into(),
                    url: "https://receiver.invalid/hook".into(),
                    ..Default::default()
                }),
                start_disabled: disabled,
                ..Default::default()
            },
            admin,
        ))
        .await
        .map(|_| ())
}

fn event(tenant: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        tenant_id: tenant.into(),
        event_type: "invoice.paid".into(),
        payload: br#"{"amount":1}"#.to_vec(),
        ..Default::default()
    }
}

fn quotas(subs: u32, deliveries: u32, rate: u32) -> Option<pb::TenantQuotas> {
    Some(pb::TenantQuotas {
        max_subscriptions: subs,
        max_deliveries_per_event: deliveries,
        max_events_per_second: rate,
        ..Default::default()
    })
}

fn assert_exhausted(status: &tonic::Status, quota: &str, value: &str, field: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let m = status.message();
    assert!(
        m.contains(&format!("the quota of {quota} is {value}")),
        "{m}"
    );
    assert!(m.contains(field), "the message says how to raise it: {m}");
    assert!(m.contains("Nothing was stored"), "{m}");
}

async fn subscriptions_per_tenant_hold_under_1100_concurrent_creates(backend: Backend) {
    let mut q = Quotas::start(backend, &[]).await;
    let tenant = q.tenant(None).await;
    // 1,100 at once, over a few connections, against the default quota of 1,000.
    let mut channels = vec![q.channel.clone()];
    for _ in 0..3 {
        channels.push(support::channel(&q.server).await);
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1100 {
        let client = RegistryServiceClient::new(channels[i % channels.len()].clone());
        let (admin, tenant) = (q.admin.clone(), tenant.clone());
        calls.spawn(async move { create_subscription(client, &admin, &tenant, true).await });
    }
    let (mut created, mut refused) = (0, Vec::new());
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(()) => created += 1,
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(created, 1000, "refused: {:?}", refused.first());
    assert_eq!(refused.len(), 100);
    assert_exhausted(
        &refused[0],
        "subscriptions per tenant",
        "1,000",
        "quotas.max_subscriptions",
    );
    assert!(
        refused[0]
            .message()
            .contains("quota_subscriptions_per_tenant")
    );
    assert_eq!(q.count_subscriptions(&tenant).await, 1000);

    // An admin raises it for this tenant: one more fits, then it is full again.
    let admin = q.admin.clone();
    let updated = q
        .set_quotas(&tenant, quotas(1001, 0, 0), &admin)
        .await
        .unwrap();
    assert_eq!(updated.quotas.unwrap().max_subscriptions, 1001);
    q.subscribe(&tenant, true).await.unwrap();
    let e = q.subscribe(&tenant, true).await.unwrap_err();
    assert_exhausted(
        &e,
        "subscriptions per tenant",
        "1,001",
        "quotas.max_subscriptions",
    );
    assert_eq!(q.count_subscriptions(&tenant).await, 1001);
    q.finish().await;
}

async fn quotas_are_set_by_admins_only_and_bounded(backend: Backend) {
    let mut q = Quotas::start(backend, &[]).await;
    let tenant = q.tenant(quotas(3, 0, 0)).await;
    let admin = q.admin.clone();
    let got = q
        .registry
        .get_tenant(authed(
            pb::GetTenantRequest {
                tenant_id: tenant.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.quotas, quotas(3, 0, 0));

    let key = q
        .registry
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                name: "tenant key".into(),
                tenant_id: tenant.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let e = q
        .set_quotas(&tenant, quotas(1_000_000, 0, 0), &key)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let e = q
        .set_quotas(&tenant, quotas(u32::MAX, 0, 0), &admin)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("quotas.max_subscriptions: is 4,294,967,295; allowed: 0 to 2,147,483,647"),
        "{}",
        e.message()
    );
    // The fair-delivery weight rides with the quotas: admin only, 0 (= 1) to 16.
    let weighted = |weight| {
        Some(pb::TenantQuotas {
            weight,
            ..quotas(3, 0, 0).unwrap()
        })
    };
    let e = q.set_quotas(&tenant, weighted(4), &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = q
        .set_quotas(&tenant, weighted(17), &admin)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("quotas.weight: is 17; allowed: 0 to 16"),
        "{}",
        e.message()
    );
    let set = q.set_quotas(&tenant, weighted(4), &admin).await.unwrap();
    assert_eq!(set.quotas, weighted(4));
    for _ in 0..3 {
        q.subscribe(&tenant, true).await.unwrap();
    }
    let e = q.subscribe(&tenant, true).await.unwrap_err();
    assert_exhausted(
        &e,
        "subscriptions per tenant",
        "3",
        "quotas.max_subscriptions",
    );
    q.finish().await;
}

async fn an_event_matching_more_subscriptions_than_its_quota_is_refused(backend: Backend) {
    let mut q = Quotas::start(backend, &[("HOOKLINE_QUOTA_DELIVERIES_PER_EVENT", "2")]).await;
    let tenant = q.tenant(None).await;
    q.subscribe(&tenant, false).await.unwrap();
    q.subscribe(&tenant, false).await.unwrap();
    q.publish(&tenant, 1).await.unwrap();
    q.subscribe(&tenant, false).await.unwrap();
    // The matcher's cache is dropped by the registry's announcement; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match q.publish(&tenant, 2).await {
            Err(e) => break e,
            Ok(()) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(()) => panic!("the third subscription was never matched"),
        }
    };
    assert_exhausted(
        &e,
        "deliveries per event",
        "2",
        "quotas.max_deliveries_per_event",
    );
    assert!(
        e.message().contains("matches 3 enabled subscriptions"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("events[0]."), "{}", e.message());
    assert!(
        e.message().contains("quota_deliveries_per_event"),
        "{}",
        e.message()
    );
    let stored = q.count_events(&tenant).await;

    // An override for this tenant lets it through.
    let admin = q.admin.clone();
    q.set_quotas(&tenant, quotas(0, 3, 0), &admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while q.publish(&tenant, 1).await.is_err() {
        assert!(Instant::now() < deadline, "the override never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(q.count_events(&tenant).await, stored + 1);
    q.finish().await;
}

async fn events_per_second_are_limited_per_tenant(backend: Backend) {
    let mut q = Quotas::start(backend, &[]).await;
    // One event per second: the bucket holds one, refilled after a second.
    let tenant = q.tenant(quotas(0, 0, 1)).await;
    let other = q.tenant(quotas(0, 0, 1)).await;
    q.publish(&tenant, 1).await.unwrap();
    let e = q.publish(&tenant, 1).await.unwrap_err();
    assert_exhausted(&e, "events per second", "1", "quotas.max_events_per_second");
    assert!(
        e.message().contains("quota_events_per_second"),
        "{}",
        e.message()
    );
    // A batch larger than a second's worth can never pass.
    let e = q.publish(&other, 2).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("more than a second's worth"),
        "{}",
        e.message()
    );
    // Another tenant has its own bucket, untouched by the refused call.
    q.publish(&other, 1).await.unwrap();
    assert_eq!(
        q.count_events(&tenant).await,
        1,
        "nothing of a refused call is stored"
    );
    assert_eq!(q.count_events(&other).await, 1);
    // It is a rate, not a cap: the bucket refills.
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.publish(&tenant, 1).await.is_err() {
        assert!(Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(q.count_events(&tenant).await, 2);
    q.finish().await;
}

/// Backpressure: with `ingest_max_backlog` set and a receiver too slow to keep up, the
/// work queues fill until publishes are refused with RESOURCE_EXHAUSTED, a retry delay
/// and the setting's name, storing nothing.
async fn publishes_are_refused_while_the_backlog_is_over_its_limit(backend: Backend) {
    let receiver = support::receiver::Receiver::start().await;
    let mut q = Quotas::start(
        backend,
        &[
            ("HOOKLINE_INGEST_MAX_BACKLOG", "50"),
            ("HOOKLINE_DISPATCHER_CONCURRENCY", "1"),
            ("HOOKLINE_DISPATCHER_PREFETCH", "1"),
            ("HOOKLINE_DISPATCHER_SHARD_PREFETCH", "1"),
        ],
    )
    .await;
    let tenant = q.tenant(None).await;
    let url = receiver.endpoint("slow", support::receiver::Behavior::Slow(10_000));
    q.registry
        .create_subscription(authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.clone(),
                    url,
                    ..Default::default()
                }),
                ..Default::default()
            },
            &q.admin,
        ))
        .await
        .expect("create the subscription");
    // 200 deliveries against a receiver that answers one per 10 s: the backlog is
    // well over 50 once ingest reads it (every 0.5 s).
    q.publish(&tenant, 200)
        .await
        .expect("below the limit, accepted");
    let mut accepted = 200;
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match q.publish(&tenant, 1).await {
            Ok(()) => accepted += 1,
            Err(status) => break status,
        }
        assert!(
            Instant::now() < deadline,
            "never refused; {accepted} accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let m = refused.message();
    assert!(m.contains("ingest_max_backlog"), "names the setting: {m}");
    assert!(m.contains("nothing was stored"), "{m}");
    let retry =
        tonic_types::StatusExt::get_details_retry_info(&refused).and_then(|r| r.retry_delay);
    assert_eq!(retry, Some(Duration::from_secs(1)), "says when to retry");
    assert_eq!(
        q.count_events(&tenant).await,
        accepted,
        "the refused event was not stored"
    );
    q.finish().await;
}

on_both_backends!(
    subscriptions_per_tenant_hold_under_1100_concurrent_creates,
    quotas_are_set_by_admins_only_and_bounded,
    an_event_matching_more_subscriptions_than_its_quota_is_refused,
    events_per_second_are_limited_per_tenant,
    publishes_are_refused_while_the_backlog_is_over_its_limit,
);

#[tokio::test]
async fn a_quota_setting_out_of_range_stops_the_server_with_the_rule() {
    let env = Env::with(Backend::Embedded).await;
    let out = env
        .command()
        .env("HOOKLINE_QUOTA_EVENTS_PER_SECOND", "0")
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .await
        .expect("run hookline serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("quota_events_per_second: is 0; allowed: 1 to 2,147,483,647"),
        "{stderr}"
    );
    env.finish().await;
}
