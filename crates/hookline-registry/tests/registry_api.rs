//! The registry over real gRPC, on a real PostgreSQL database and a real RabbitMQ prefix
//! of its own per test.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hookline_broker::{Broker, ChangeNotice, RabbitBroker, RabbitConfig};
use hookline_core::model::RegistryChange;
use hookline_core::{Id, IdKind};
use hookline_grpc::{Authenticator, auth};
use hookline_proto::v1 as pb;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use hookline_registry::RegistryApi;
use hookline_store::port::{NewApiKey, RegistryStore};
use hookline_store::postgres::PgStore;
use hookline_testkit::TestDb;
use tonic::transport::Channel;
use tonic::{Code, Request};

struct Harness {
    db: TestDb,
    store: Arc<PgStore>,
    broker: Arc<RabbitBroker>,
    client: RegistryServiceClient<Channel>,
    admin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let db = TestDb::create().await;
        let store = Arc::new(PgStore::connect(db.url(), 4).await.unwrap());
        store.migrate().await.unwrap();
        let prefix = hookline_testkit::unique_name("test_registry_");
        let mut cfg = RabbitConfig::new(hookline_testkit::amqp_url(), prefix.clone());
        cfg.connection_name = prefix;
        let broker = Arc::new(RabbitBroker::connect(cfg).await.unwrap());
        let admin = mint_key(store.as_ref(), None).await;

        let registry: Arc<dyn RegistryStore> = store.clone();
        let api = RegistryApi::new(
            registry.clone(),
            broker.clone(),
            Authenticator::new(registry),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(api.into_server())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        let client = RegistryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Harness {
            db,
            store,
            broker,
            client,
            admin,
            stop,
            server,
        }
    }

    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
        self.broker.delete_topology().await.unwrap();
        self.broker.close().await;
        self.store.close().await;
        self.db.drop_db().await;
    }

    async fn tenant(&mut self, name: &str) -> pb::Tenant {
        self.client
            .create_tenant(authed(
                pb::CreateTenantRequest {
                    name: name.into(),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn subscription(
        &mut self,
        tenant: &str,
        url: &str,
        filters: &[&str],
    ) -> Result<pb::CreateSubscriptionResponse, tonic::Status> {
        let admin = self.admin.clone();
        self.client
            .create_subscription(authed(new_sub(tenant, url, filters), &admin))
            .await
            .map(|r| r.into_inner())
    }

    async fn subscription_count(&mut self, tenant: &str) -> usize {
        let admin = self.admin.clone();
        self.client
            .list_subscriptions(authed(
                pb::ListSubscriptionsRequest {
                    tenant_id: tenant.into(),
                    page_size: 1000,
                    page_token: String::new(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .subscriptions
            .len()
    }
}

async fn mint_key(store: &PgStore, tenant: Option<&str>) -> String {
    let token = auth::generate_token();
    store
        .create_api_key(&NewApiKey {
            id: Id::new(IdKind::ApiKey),
            name: "test".into(),
            tenant_id: tenant.map(|t| Id::parse(IdKind::Tenant, "t", t).unwrap()),
            token_prefix: token.prefix.clone(),
            token_hash: token.hash,
        })
        .await
        .unwrap();
    token.token
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn new_sub(tenant: &str, url: &str, filters: &[&str]) -> pb::CreateSubscriptionRequest {
    pb::CreateSubscriptionRequest {
        subscription: Some(pb::Subscription {
            tenant_id: tenant.into(),
            url: url.into(),
            event_types: filters.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        start_disabled: false,
        secret: String::new(),
    }
}

#[tokio::test]
async fn tenants_can_be_created_listed_in_pages_updated_and_deleted() {
    let mut h = Harness::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(h.tenant(&format!("tenant {i}")).await.id);
    }
    let admin = h.admin.clone();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = h
            .client
            .list_tenants(authed(
                pb::ListTenantsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.tenants.len() <= 2);
        seen.extend(page.tenants.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids, "every tenant once, in creation order");
    assert_eq!(pages, 3);

    let got = h
        .client
        .get_tenant(authed(
            pb::GetTenantRequest {
                tenant_id: ids[1].clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "tenant 1");

    let updated = h
        .client
        .update_tenant(authed(
            pb::UpdateTenantRequest {
                tenant_id: ids[1].clone(),
                name: Some("renamed".into()),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.name, "renamed");

    h.client
        .delete_tenant(authed(
            pb::DeleteTenantRequest {
                tenant_id: ids[1].clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = h
        .client
        .get_tenant(authed(
            pb::GetTenantRequest {
                tenant_id: ids[1].clone(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.finish().await;
}

#[tokio::test]
async fn subscriptions_can_be_created_read_listed_updated_and_deleted() {
    let mut h = Harness::start().await;
    let tenant = h.tenant("acme").await.id;
    let admin = h.admin.clone();
    let created = h
        .subscription(&tenant, "https://example.com/hooks", &["invoice.*"])
        .await
        .unwrap();
    assert!(created.secret.starts_with("whsec_"));
    let sub = created.subscription.unwrap();
    assert!(sub.id.starts_with("sub_"));
    assert_eq!(sub.state, pb::SubscriptionState::Enabled as i32);

    for i in 0..4 {
        h.subscription(&tenant, &format!("https://example.com/{i}"), &[])
            .await
            .unwrap();
    }
    let first = h
        .client
        .list_subscriptions(authed(
            pb::ListSubscriptionsRequest {
                tenant_id: tenant.clone(),
                page_size: 3,
                page_token: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.subscriptions.len(), 3);
    assert_eq!(first.subscriptions[0].id, sub.id);
    let second = h
        .client
        .list_subscriptions(authed(
            pb::ListSubscriptionsRequest {
                tenant_id: tenant.clone(),
                page_size: 3,
                page_token: first.next_page_token,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.subscriptions.len(), 2);
    assert!(second.next_page_token.is_empty());

    let updated = h
        .client
        .update_subscription(authed(
            pb::UpdateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    id: sub.id.clone(),
                    url: "https://example.com/v2".into(),
                    event_types: vec!["invoice.paid".into()],
                    description: "ignored: not in the mask".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["url".into(), "event_types".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.url, "https://example.com/v2");
    assert_eq!(updated.event_types, vec!["invoice.paid".to_string()]);
    assert_eq!(updated.description, "");

    let got = h
        .client
        .get_subscription(authed(
            pb::GetSubscriptionRequest {
                subscription_id: sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, updated);

    let secret = h
        .client
        .get_secret(authed(
            pb::GetSecretRequest {
                subscription_id: sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secret.secret, created.secret);
    let rotated = h
        .client
        .rotate_secret(authed(
            pb::RotateSecretRequest {
                subscription_id: sub.id.clone(),
                grace_period: None,
                secret: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let after = h
        .client
        .get_secret(authed(
            pb::GetSecretRequest {
                subscription_id: sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.secret, rotated.secret);
    let live: Vec<_> = after
        .live_secrets
        .iter()
        .map(|s| s.secret.clone())
        .collect();
    assert_eq!(live, vec![rotated.secret.clone(), created.secret.clone()]);

    h.client
        .delete_subscription(authed(
            pb::DeleteSubscriptionRequest {
                subscription_id: sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = h
        .client
        .get_subscription(authed(
            pb::GetSubscriptionRequest {
                subscription_id: sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(h.subscription_count(&tenant).await, 4);
    h.finish().await;
}

#[tokio::test]
async fn match_subscriptions_applies_exact_wildcard_and_empty_filters() {
    let mut h = Harness::start().await;
    let tenant = h.tenant("acme").await.id;
    let other = h.tenant("other").await.id;
    let admin = h.admin.clone();
    let exact = h
        .subscription(&tenant, "https://a.example/", &["invoice.paid"])
        .await
        .unwrap();
    let wild = h
        .subscription(&tenant, "https://b.example/", &["invoice.*"])
        .await
        .unwrap();
    let all = h
        .subscription(&tenant, "https://c.example/", &[])
        .await
        .unwrap();
    let users = h
        .subscription(&tenant, "https://d.example/", &["user.created"])
        .await
        .unwrap();
    h.subscription(&other, "https://e.example/", &[])
        .await
        .unwrap();
    let mut disabled = new_sub(&tenant, "https://f.example/", &[]);
    disabled.start_disabled = true;
    h.client
        .create_subscription(authed(disabled, &admin))
        .await
        .unwrap();

    let matching = |event_type: &str| {
        let req = authed(
            pb::MatchSubscriptionsRequest {
                tenant_id: tenant.clone(),
                event_type: event_type.into(),
                channels: vec![],
            },
            &admin,
        );
        let mut client = h.client.clone();
        async move {
            let mut ids: Vec<String> = client
                .match_subscriptions(req)
                .await
                .unwrap()
                .into_inner()
                .subscriptions
                .into_iter()
                .map(|s| s.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let id = |r: &pb::CreateSubscriptionResponse| r.subscription.as_ref().unwrap().id.clone();
    let mut want = vec![id(&exact), id(&wild), id(&all)];
    want.sort();
    assert_eq!(matching("invoice.paid").await, want);
    let mut want = vec![id(&wild), id(&all)];
    want.sort();
    assert_eq!(matching("invoice.voided").await, want);
    let mut want = vec![id(&users), id(&all)];
    want.sort();
    assert_eq!(matching("user.created").await, want);
    assert_eq!(matching("order.shipped").await, vec![id(&all)]);
    h.finish().await;
}

#[tokio::test]
async fn keys_are_required_and_tenant_keys_stay_in_their_tenant() {
    let mut h = Harness::start().await;
    let mine = h.tenant("mine").await.id;
    let theirs = h.tenant("theirs").await.id;
    let their_sub = h
        .subscription(&theirs, "https://secret-endpoint.example/", &[])
        .await
        .unwrap()
        .subscription
        .unwrap();
    let tenant_key = mint_key(h.store.as_ref(), Some(&mine)).await;

    // No key, a malformed header, an unknown key.
    let err = h
        .client
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{}", err.message());
    let err = h
        .client
        .list_tenants(authed(
            pb::ListTenantsRequest::default(),
            "hl_not-a-real-key",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A tenant key on its own tenant works.
    h.client
        .create_subscription(authed(
            new_sub(&mine, "https://mine.example/", &[]),
            &tenant_key,
        ))
        .await
        .unwrap();
    assert_eq!(
        h.client
            .get_tenant(authed(
                pb::GetTenantRequest {
                    tenant_id: mine.clone()
                },
                &tenant_key
            ))
            .await
            .unwrap()
            .into_inner()
            .id,
        mine
    );

    // …and is denied on another tenant, without learning anything about it.
    let err = h
        .client
        .get_tenant(authed(
            pb::GetTenantRequest {
                tenant_id: theirs.clone(),
            },
            &tenant_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(!err.message().contains("theirs"));
    let err = h
        .client
        .list_subscriptions(authed(
            pb::ListSubscriptionsRequest {
                tenant_id: theirs.clone(),
                ..Default::default()
            },
            &tenant_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .client
        .get_subscription(authed(
            pb::GetSubscriptionRequest {
                subscription_id: their_sub.id.clone(),
            },
            &tenant_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!err.message().contains("secret-endpoint"));
    let err = h
        .client
        .get_secret(authed(
            pb::GetSecretRequest {
                subscription_id: their_sub.id.clone(),
            },
            &tenant_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .client
        .create_subscription(authed(
            new_sub(&theirs, "https://x.example/", &[]),
            &tenant_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .client
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "sneaky".into(),
                ..Default::default()
            },
            &tenant_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let listed = h
        .client
        .list_tenants(authed(pb::ListTenantsRequest::default(), &tenant_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .tenants
            .iter()
            .map(|t| t.id.clone())
            .collect::<Vec<_>>(),
        vec![mine.clone()]
    );
    assert_eq!(
        h.subscription_count(&theirs).await,
        1,
        "nothing was created"
    );

    // The admin key works on every tenant.
    let admin = h.admin.clone();
    h.client
        .get_subscription(authed(
            pb::GetSubscriptionRequest {
                subscription_id: their_sub.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();

    // A revoked key is refused from then on.
    let created = h
        .client
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                name: "short-lived".into(),
                tenant_id: mine.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let short = created.token.clone();
    h.client
        .get_tenant(authed(
            pb::GetTenantRequest {
                tenant_id: mine.clone(),
            },
            &short,
        ))
        .await
        .unwrap();
    h.client
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest {
                api_key_id: created.api_key.unwrap().id,
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = h
        .client
        .get_tenant(authed(
            pb::GetTenantRequest {
                tenant_id: mine.clone(),
            },
            &short,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    h.finish().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_and_rule_and_nothing_is_stored() {
    let mut h = Harness::start().await;
    let tenant = h.tenant("acme").await.id;
    let long_url = format!("https://example.com/{}", "a".repeat(2048));
    let cases: Vec<(pb::CreateSubscriptionRequest, &str, &str)> = vec![
        (
            new_sub(&tenant, "ftp://example.com/x", &[]),
            "subscription.url",
            "only http and https",
        ),
        (
            new_sub(&tenant, "https://user:pw@example.com/x", &[]),
            "subscription.url",
            "credentials",
        ),
        (
            new_sub(&tenant, &long_url, &[]),
            "subscription.url",
            "the limit is 2048",
        ),
        (new_sub(&tenant, "", &[]), "subscription.url", "is required"),
        (
            new_sub(&tenant, "https://example.com/", &[""]),
            "subscription.event_types[0]",
            "is empty",
        ),
        (
            new_sub(&tenant, "https://example.com/", &["invoice..paid"]),
            "subscription.event_types[0]",
            "not a valid filter",
        ),
        (
            new_sub(&tenant, "https://example.com/", &["ok.type", "*.paid"]),
            "subscription.event_types[1]",
            "not a valid filter",
        ),
        (
            new_sub(
                &Id::new(IdKind::Tenant).into_string(),
                "https://example.com/",
                &[],
            ),
            "subscription.tenant_id",
            "does not exist",
        ),
        (
            new_sub("not-a-tenant", "https://example.com/", &[]),
            "subscription.tenant_id",
            "not a tenant id",
        ),
    ];
    let admin = h.admin.clone();
    for (req, field, rule) in cases {
        let err = h
            .client
            .create_subscription(authed(req, &admin))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(field),
            "{:?} should name {field}",
            err.message()
        );
        assert!(
            err.message().contains(rule),
            "{:?} should say {rule}",
            err.message()
        );
    }
    assert_eq!(h.subscription_count(&tenant).await, 0, "nothing was stored");

    let err = h
        .client
        .create_tenant(authed(pb::CreateTenantRequest::default(), &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("name:"), "{}", err.message());
    h.finish().await;
}

#[tokio::test]
async fn every_change_is_announced_on_the_fanout_exchange() {
    let mut h = Harness::start().await;
    let mut changes = h.broker.changes().await.unwrap();
    let tenant = h.tenant("acme").await.id;
    let sub = h
        .subscription(&tenant, "https://example.com/", &[])
        .await
        .unwrap()
        .subscription
        .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        let notice = tokio::time::timeout_at(deadline, changes.next())
            .await
            .expect("changes within 10 s")
            .expect("stream open");
        if let ChangeNotice::Change(body) = notice {
            seen.push(serde_json::from_slice::<RegistryChange>(&body).unwrap());
        }
    }
    assert_eq!(
        seen,
        vec![
            RegistryChange::Tenant {
                tenant_id: Id::from_trusted(tenant.clone())
            },
            RegistryChange::Subscription {
                tenant_id: Id::from_trusted(tenant),
                subscription_id: Id::from_trusted(sub.id),
            },
        ]
    );
    drop(changes);
    h.finish().await;
}

/// Handlers read their caller only from the request's extensions, where the gate puts
/// it: a service reached without the gate refuses even a valid key (there is no
/// anonymous caller), and an in-process caller that inserts a `Principal` itself (the
/// trusted path the REST API and the console use) is served without a key.
#[tokio::test]
async fn a_request_without_a_principal_is_refused() {
    use hookline_grpc::Principal;
    use hookline_proto::v1::registry_service_server::RegistryService;
    let h = Harness::start().await;
    let registry: Arc<dyn RegistryStore> = h.store.clone();
    let ungated = RegistryApi::new(
        registry.clone(),
        h.broker.clone(),
        Authenticator::new(registry),
    );
    let err = ungated
        .list_tenants(authed(pb::ListTenantsRequest::default(), &h.admin))
        .await
        .expect_err("no principal in the extensions");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "this call was not authenticated");

    let mut trusted = Request::new(pb::ListTenantsRequest::default());
    trusted.extensions_mut().insert(Principal::Admin {
        key_id: Id::new(IdKind::ApiKey),
    });
    ungated
        .list_tenants(trusted)
        .await
        .expect("a principal inserted in process is served");
    h.finish().await;
}
