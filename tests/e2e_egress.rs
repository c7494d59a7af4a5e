//! The egress policy end to end, on both backends: the real `hookline serve` refuses
//! every refused form of a subscription URL at create (and update) time with
//! `INVALID_ARGUMENT` naming the field, the class and the setting; stores the normalised
//! URL; and at delivery records an `egress` attempt without connecting when the policy
//! refuses an address a subscription was created with.

#[macro_use]
mod support;

use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::delivery_service_client::DeliveryServiceClient;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use hookline_testkit::CountingListener;
use support::{Backend, Env, Server, authed};
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

/// A server with `allow` as its `HOOKLINE_EGRESS_ALLOW`, an admin key and a tenant.
struct Setup {
    server: Server,
    admin: String,
    tenant: String,
    registry: RegistryServiceClient<Channel>,
}

async fn serve(env: &Env, admin: &str, allow: &str, tenant: Option<String>) -> Setup {
    let server = env
        .serve_with(
            "all",
            &[
                ("HOOKLINE_EGRESS_ALLOW", allow),
                ("HOOKLINE_RETRY_POLL_INTERVAL_MS", "50"),
            ],
        )
        .await;
    let channel = support::channel(&server).await;
    let registry = RegistryServiceClient::new(channel.clone());
    let tenant = match tenant {
        Some(t) => t,
        None => support::create_tenant(&channel, admin, "acme", None).await,
    };
    Setup {
        server,
        admin: admin.to_string(),
        tenant,
        registry,
    }
}

impl Setup {
    /// Stops the server (it must exit cleanly) and drops the test's storage.
    async fn finish(self, env: Env) {
        let status = self.server.terminate().await;
        assert!(status.success(), "hookline exited with {status}");
        env.finish().await;
    }

    async fn create(&mut self, url: &str) -> Result<pb::Subscription, tonic::Status> {
        self.registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: self.tenant.clone(),
                        url: url.into(),
                        // One quick retry, then the delivery fails for good.
                        retry_policy: Some(pb::RetryPolicy {
                            schedule: vec![prost_types::Duration {
                                seconds: 0,
                                nanos: 100_000_000,
                            }],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .map(|r| r.into_inner().subscription.unwrap())
    }

    async fn subscription_count(&mut self) -> usize {
        self.registry
            .list_subscriptions(authed(
                pb::ListSubscriptionsRequest {
                    tenant_id: self.tenant.clone(),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .subscriptions
            .len()
    }
}

/// Every refused form, with a word its class must name.
const REFUSED: &[(&str, &str)] = &[
    ("http://127.0.0.1:9090/metrics", "loopback"),
    ("http://localhost:8000/webhook", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://[64:ff9b::7f00:1]/", "NAT64"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1:5432/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fd00::1]/", "unique local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://192.0.2.1/", "documentation"),
    ("http://[2001:db8::1]/", "documentation"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://127.0.0.1:47101\\@evil.example/bs", "loopback"),
];

async fn every_refused_form_is_refused_at_create_and_update(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let mut s = serve(&env, &admin, "", None).await;
    for (url, class) in REFUSED {
        let e = s.create(url).await.expect_err(url);
        assert_eq!(e.code(), Code::InvalidArgument, "{url}: {e:?}");
        let m = e.message();
        assert!(m.starts_with("subscription.url: "), "{url}: {m}");
        assert!(m.contains(class), "{url}: {m}");
        assert!(m.contains("egress_allow"), "{url}: {m}");
    }
    let m = s.create("http://localhost:8000/").await.unwrap_err();
    assert!(
        m.message().contains("HOOKLINE_EGRESS_ALLOW=127.0.0.1/32"),
        "{m:?}"
    );
    assert_eq!(s.subscription_count().await, 0, "nothing is stored");

    // A name that does not resolve yet is not an error; a global address is fine.
    let later = s.create("https://hookline-egress-test.invalid/hook").await;
    assert!(later.is_ok(), "{later:?}");
    let sub = s.create("https://93.184.216.34/hook").await.unwrap();

    // Updating the URL to a refused one is refused the same way, and changes nothing.
    let e = s
        .registry
        .update_subscription(authed(
            pb::UpdateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    id: sub.id.clone(),
                    url: "http://[::ffff:169.254.169.254]/".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["url".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("link-local"), "{e:?}");
    let got = s
        .registry
        .get_subscription(authed(
            pb::GetSubscriptionRequest {
                subscription_id: sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.url, "https://93.184.216.34/hook");

    s.finish(env).await;
}

async fn allowed_urls_are_stored_as_they_will_be_requested(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let mut s = serve(&env, &admin, "127.0.0.1/32", None).await;
    // The backslash is a path separator to the URL parser (and to the HTTP client): the
    // request goes to 127.0.0.1, and that is what is stored and shown.
    let sub = s
        .create("http://127.0.0.1:47101\\@evil.example/bs")
        .await
        .unwrap();
    assert_eq!(sub.url, "http://127.0.0.1:47101/@evil.example/bs");
    let sub = s.create("HTTP://0x7F000001:8000/a/../hook").await.unwrap();
    assert_eq!(sub.url, "http://127.0.0.1:8000/hook");
    // Only the allowed address: its neighbour and the IPv6 loopback stay refused.
    for url in ["http://127.0.0.2/", "http://[::1]/"] {
        let e = s.create(url).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{url}");
    }
    s.finish(env).await;
}

async fn a_target_allowed_at_create_but_refused_now_gets_no_connection(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let listener = CountingListener::bind("127.0.0.1:0").await;
    // Created while 127.0.0.1 was allowed…
    let mut s = serve(&env, &admin, "127.0.0.1/32", None).await;
    let sub = s
        .create(&format!("http://{}/hook", listener.addr))
        .await
        .unwrap();
    let tenant = s.tenant.clone();
    assert!(s.server.terminate().await.success());
    // …delivered under the default policy.
    let s = serve(&env, &admin, "", Some(tenant.clone())).await;
    let channel = Channel::from_shared(s.server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let published = IngestServiceClient::new(channel.clone())
        .publish(authed(
            pb::PublishRequest {
                tenant_id: tenant,
                event_type: "invoice.paid".into(),
                payload: b"{}".to_vec(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut deliveries = DeliveryServiceClient::new(channel);
    let deadline = tokio::time::Instant::now() + WAIT;
    let got = loop {
        let list = deliveries
            .list_deliveries(authed(
                pb::ListDeliveriesRequest {
                    event_id: published.event_id.clone(),
                    subscription_id: sub.id.clone(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        let done = list
            .first()
            .is_some_and(|d| d.status == pb::DeliveryStatus::Failed as i32);
        if done {
            let id = list[0].id.clone();
            break deliveries
                .get_delivery(authed(pb::GetDeliveryRequest { delivery_id: id }, &admin))
                .await
                .unwrap()
                .into_inner();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delivery did not fail: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.attempts.len(), 2, "{got:?}");
    for attempt in &got.attempts {
        assert_eq!(
            attempt.error_class,
            pb::ErrorClass::Egress as i32,
            "{attempt:?}"
        );
        assert!(attempt.response_excerpt.is_empty());
        assert!(
            attempt
                .error_message
                .starts_with("refused by the egress policy: 127.0.0.1 is a loopback address"),
            "{attempt:?}"
        );
        assert!(
            attempt
                .error_message
                .contains("HOOKLINE_EGRESS_ALLOW=127.0.0.1/32"),
            "{attempt:?}"
        );
    }
    assert_eq!(listener.connections(), 0, "a connection was made");
    s.finish(env).await;
}

on_both_backends!(
    every_refused_form_is_refused_at_create_and_update,
    allowed_urls_are_stored_as_they_will_be_requested,
    a_target_allowed_at_create_but_refused_now_gets_no_connection,
);
