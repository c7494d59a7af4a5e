//! Secrets at rest (issue #10 part 4), end to end with the real binary on both backends:
//! the raw SQLite file and the raw PostgreSQL rows hold no signing secret and no header
//! value in clear; sensitive header values come back masked; `admin
//! rotate-encryption-key` re-seals every row while deliveries keep verifying (the
//! receiver checks signatures with the secret `GetSecret` returns); a start without the
//! key while sealed rows exist is refused and changes nothing; the embedded data
//! directory is private.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, Server, authed};
use tonic::transport::Channel;

on_both_backends!(
    secrets_are_sealed_at_rest_and_masked_in_answers,
    rotation_reseals_every_row_while_deliveries_verify,
    a_start_without_the_key_is_refused_when_rows_are_sealed,
);

const BEARER: &str = "Bearer sealed-e2e-bearer-7f3a9c";
const API_KEY: &str = "sealed-e2e-api-key-51d0e2";
const TEAM: &str = "sealed-e2e-team-value-0b8d";
const SEALED: &str = "hlsealed:v1:";

fn key(id: &str) -> String {
    hookline_seal::Keyring::generate_spec(id)
        .expect("a key")
        .trim()
        .to_string()
}

/// gRPC clients of one server with an admin key and a tenant.
struct Api {
    registry: RegistryServiceClient<Channel>,
    ingest: IngestServiceClient<Channel>,
    admin: String,
    tenant: String,
}

impl Api {
    async fn connect(server: &Server, admin: &str, tenant: Option<&str>) -> Api {
        let channel = support::channel(server).await;
        let tenant = match tenant {
            Some(t) => t.to_string(),
            None => support::create_tenant(&channel, admin, "acme", None).await,
        };
        Api {
            registry: RegistryServiceClient::new(channel.clone()),
            ingest: IngestServiceClient::new(channel),
            admin: admin.to_string(),
            tenant,
        }
    }

    /// A subscription to `name` with the test's headers; the receiver verifies with the
    /// secret `GetSecret` returns. Returns the id and the secret.
    async fn subscribe(&mut self, receiver: &Receiver, name: &str) -> (String, String) {
        let headers = BTreeMap::from([
            ("Authorization".to_string(), BEARER.to_string()),
            ("X-Api-Key".to_string(), API_KEY.to_string()),
            ("X-Team".to_string(), TEAM.to_string()),
        ]);
        let created = self
            .registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        tenant_id: self.tenant.clone(),
                        url: receiver.endpoint(name, Behavior::Ok),
                        headers,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .expect("create a subscription")
            .into_inner();
        let id = created.subscription.expect("subscription").id;
        let secret = self.secret(&id).await;
        receiver.set_secret(name, &secret);
        (id, secret)
    }

    async fn secret(&mut self, id: &str) -> String {
        self.registry
            .get_secret(authed(
                pb::GetSecretRequest {
                    subscription_id: id.into(),
                },
                &self.admin,
            ))
            .await
            .expect("GetSecret")
            .into_inner()
            .secret
    }

    async fn publish(&mut self, n: u32) {
        let req = pb::PublishRequest {
            tenant_id: self.tenant.clone(),
            event_type: "sealed.test".into(),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            ..Default::default()
        };
        self.ingest
            .publish(authed(req, &self.admin))
            .await
            .expect("publish");
    }

    async fn get(&mut self, id: &str) -> pb::Subscription {
        self.registry
            .get_subscription(authed(
                pb::GetSubscriptionRequest {
                    subscription_id: id.into(),
                },
                &self.admin,
            ))
            .await
            .expect("GetSubscription")
            .into_inner()
    }
}

/// Waits until `name` got `n` requests, every one verified and carrying the headers in
/// clear.
async fn all_verified(receiver: &Receiver, name: &str, n: usize) {
    let got = receiver
        .wait_for(name, Duration::from_secs(60), "deliveries", |r| {
            r.len() >= n
        })
        .await;
    for r in &got {
        assert!(r.verified, "a delivery did not verify: {:?}", r.headers);
        assert_eq!(r.header("authorization"), BEARER);
        assert_eq!(r.header("x-api-key"), API_KEY);
    }
}

const RAW_ROWS: &str = "SELECT secret FROM subscription_secrets \
                        UNION ALL SELECT CAST(headers AS TEXT) FROM subscriptions";

/// The stored secret columns as raw text, read with SQL beside the server.
async fn raw_rows(env: &Env) -> Vec<String> {
    let rows: Vec<(String,)> = match &env.db {
        Some(db) => {
            let pool = sqlx::PgPool::connect(db.url()).await.expect("connect");
            let rows = sqlx::query_as(RAW_ROWS).fetch_all(&pool).await;
            pool.close().await;
            rows
        }
        None => {
            let file = env.data_dir.join("hookline.db");
            let url = format!("sqlite://{}?mode=ro", file.display());
            let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
            let rows = sqlx::query_as(RAW_ROWS).fetch_all(&pool).await;
            pool.close().await;
            rows
        }
    }
    .expect("read raw rows");
    rows.into_iter().map(|(v,)| v).collect()
}

/// The raw rows, and for the embedded backend every byte of its database and log files.
async fn raw_store(env: &Env) -> Vec<String> {
    let mut raw = raw_rows(env).await;
    if env.db.is_none() {
        raw.extend(
            ["hookline.db", "hookline.db-wal"]
                .iter()
                .filter_map(|f| std::fs::read(env.data_dir.join(f)).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        );
    }
    raw
}

/// Fails if any secret is readable in the raw store.
async fn assert_nothing_in_clear(env: &Env, secrets: &[&str]) {
    let raw = raw_store(env).await.join("\n");
    assert!(!raw.is_empty());
    for needle in secrets.iter().copied().chain([BEARER, API_KEY, TEAM]) {
        assert!(!raw.contains(needle), "{needle:?} is stored in clear");
    }
}

/// The key ids of the sealed values in the raw rows (every value must be sealed).
async fn key_ids(env: &Env) -> Vec<String> {
    let mut ids = Vec::new();
    for row in raw_rows(env).await {
        let values: Vec<String> = match serde_json::from_str::<BTreeMap<String, String>>(&row) {
            Ok(map) => map.into_values().collect(),
            Err(_) => vec![row],
        };
        for v in values {
            let rest = v
                .strip_prefix(SEALED)
                .unwrap_or_else(|| panic!("unsealed {v:?}"));
            ids.push(rest.split(':').next().unwrap_or_default().to_string());
        }
    }
    assert!(!ids.is_empty());
    ids
}

async fn secrets_are_sealed_at_rest_and_masked_in_answers(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let mut settings: Vec<(&str, String)> = vec![("HOOKLINE_REST_ADDR", "127.0.0.1:0".into())];
    if backend == Backend::Distributed {
        // The embedded mode makes its own key file.
        settings.push(("HOOKLINE_ENCRYPTION_KEY", key("k1")));
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = env.serve_with("all", &settings).await;
    let receiver = Receiver::start().await;
    let mut api = Api::connect(&server, &admin, None).await;
    let (id, secret) = api.subscribe(&receiver, "hook").await;
    assert!(secret.starts_with("whsec_"));
    api.publish(1).await;
    all_verified(&receiver, "hook", 1).await;

    // Sensitive values are masked in Get and List; others are shown.
    let shown = api.get(&id).await;
    assert_eq!(shown.headers["Authorization"], "********");
    assert_eq!(shown.headers["X-Api-Key"], "********");
    assert_eq!(shown.headers["X-Team"], TEAM);
    let listed = api
        .registry
        .list_subscriptions(authed(
            pb::ListSubscriptionsRequest {
                tenant_id: api.tenant.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("ListSubscriptions")
        .into_inner();
    assert_eq!(listed.subscriptions[0].headers["Authorization"], "********");
    // REST answers what gRPC does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rest = server.rest.clone().expect("the REST address");
    let text = reqwest::Client::new()
        .get(format!("{rest}/v1/subscriptions/{id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("REST GetSubscription")
        .text()
        .await
        .expect("a body");
    let got: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(got["headers"]["Authorization"], "********", "{got}");
    assert_eq!(got["headers"]["X-Team"], TEAM, "{got}");

    // Sending the masked headers back (a read-modify-write) keeps the stored values.
    let mut patch = shown.clone();
    patch.description = "changed".into();
    api.registry
        .update_subscription(authed(
            pb::UpdateSubscriptionRequest {
                subscription: Some(patch),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["headers".into(), "description".into()],
                }),
            },
            &admin,
        ))
        .await
        .expect("UpdateSubscription");
    api.publish(2).await;
    all_verified(&receiver, "hook", 2).await;

    let secret_key = secret.trim_start_matches("whsec_");
    assert_nothing_in_clear(&env, &[secret_key]).await;
    assert!(key_ids(&env).await.iter().all(|id| id == "k1"));
    if backend == Backend::Embedded {
        let mode = |f: &str| {
            std::fs::metadata(env.data_dir.join(f))
                .unwrap_or_else(|e| panic!("{f}: {e}"))
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700, "data directory");
        for f in [
            "hookline.db",
            "hookline.db-wal",
            "hookline.db-shm",
            "encryption.key",
        ] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
    }
    assert!(server.terminate().await.success());
    env.finish().await;
}

async fn rotation_reseals_every_row_while_deliveries_verify(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    let (k1, k2) = (key("k1"), key("k2"));
    let receiver = Receiver::start().await;

    // Rows written before sealing: on PostgreSQL a server without a key stores them in
    // clear; the embedded mode seals from its first start with the key file it made
    // (`admin_key` ran `migrate`), whose key is k1.
    let (k1, first_key) = match backend {
        Backend::Distributed => (k1, String::new()),
        Backend::Embedded => {
            let file = std::fs::read_to_string(env.data_dir.join("encryption.key"));
            (
                file.expect("the embedded key file").trim().to_string(),
                String::new(),
            )
        }
    };
    let server = env
        .serve_with("all", &[("HOOKLINE_ENCRYPTION_KEY", &first_key)])
        .await;
    let mut api = Api::connect(&server, &admin, None).await;
    let tenant = api.tenant.clone();
    let (_, secret) = api.subscribe(&receiver, "a").await;
    let (_, secret_b) = api.subscribe(&receiver, "b").await;
    api.publish(0).await;
    all_verified(&receiver, "a", 1).await;

    // A rolling restart: each new server starts before the old one stops (the embedded
    // file has one owner, so there the old one stops first). A second server with k1
    // seals the plaintext rows at its start; then servers learn k2 (current) beside k1.
    let both = format!("{k2},{k1}");
    let mut served = server;
    for keys in [&k1, &both] {
        served = match backend {
            Backend::Distributed => {
                let next = env
                    .serve_with("all", &[("HOOKLINE_ENCRYPTION_KEY", keys)])
                    .await;
                assert!(served.terminate().await.success());
                next
            }
            Backend::Embedded => {
                assert!(served.terminate().await.success());
                env.serve_with("all", &[("HOOKLINE_ENCRYPTION_KEY", keys)])
                    .await
            }
        };
        if keys == &k1 {
            assert!(key_ids(&env).await.iter().all(|id| id == "k1"));
        }
    }

    // Publishing keeps going while the rotation runs.
    let publisher = {
        let mut api = Api::connect(&served, &admin, Some(&tenant)).await;
        tokio::spawn(async move {
            for n in 1..=40 {
                api.publish(n).await;
            }
        })
    };
    let out = env
        .command()
        .env("HOOKLINE_ENCRYPTION_KEY", &both)
        .args(["admin", "rotate-encryption-key"])
        .output()
        .await
        .expect("run rotate-encryption-key");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("under key \"k2\""), "{said}");
    publisher.await.expect("publisher");
    all_verified(&receiver, "a", 41).await;
    all_verified(&receiver, "b", 41).await;

    let ids = key_ids(&env).await;
    assert!(ids.iter().all(|id| id == "k2"), "{ids:?}");
    assert!(served.terminate().await.success());
    // k1 is gone: k2 alone opens every row and GetSecret still matches the receiver's.
    let last = env
        .serve_with("all", &[("HOOKLINE_ENCRYPTION_KEY", &k2)])
        .await;
    let mut api2 = Api::connect(&last, &admin, Some(&tenant)).await;
    let ids: Vec<String> = api2
        .registry
        .list_subscriptions(authed(
            pb::ListSubscriptionsRequest {
                tenant_id: tenant.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("list")
        .into_inner()
        .subscriptions
        .into_iter()
        .map(|s| s.id)
        .collect();
    let mut secrets = Vec::new();
    for id in &ids {
        secrets.push(api2.secret(id).await);
    }
    assert!(secrets.contains(&secret) && secrets.contains(&secret_b));
    api2.publish(99).await;
    all_verified(&receiver, "a", 42).await;
    assert_nothing_in_clear(
        &env,
        &[
            secret.trim_start_matches("whsec_"),
            secret_b.trim_start_matches("whsec_"),
        ],
    )
    .await;
    assert!(last.terminate().await.success());
    env.finish().await;
}

async fn a_start_without_the_key_is_refused_when_rows_are_sealed(backend: Backend) {
    let env = Env::with(backend).await;
    let admin = env.admin_key().await;
    // The key comes from the setting; the embedded key file `admin_key` made goes.
    let _ = std::fs::remove_file(env.data_dir.join("encryption.key"));
    let k1 = key("k1");
    let server = env
        .serve_with("all", &[("HOOKLINE_ENCRYPTION_KEY", &k1)])
        .await;
    let receiver = Receiver::start().await;
    let mut api = Api::connect(&server, &admin, None).await;
    api.subscribe(&receiver, "hook").await;
    assert!(server.terminate().await.success());
    let before = raw_store(&env).await;

    for args in [&["migrate"][..], &["serve"][..]] {
        let out = env
            .command()
            .env_remove("HOOKLINE_ENCRYPTION_KEY")
            .args(args)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("refused within 60 s")
            .expect("run hookline");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started without the key");
        assert!(
            err.contains("HOOKLINE_ENCRYPTION_KEY") && err.contains("\"k1\""),
            "{args:?}: {err}"
        );
        assert!(err.contains("Nothing was changed"), "{err}");
    }
    if backend == Backend::Embedded {
        // Its own key file was never made, let alone a new one.
        assert!(!env.data_dir.join("encryption.key").exists());
    }
    assert_eq!(raw_store(&env).await, before, "rows changed");
    // A wrong key is refused as well, naming the missing id; so is another key under
    // the same id (the values are opened at start, not only matched by id).
    for (keyring, says) in [(key("k9"), "\"k1\""), (key("k1"), "damaged")] {
        let out = env
            .command()
            .env("HOOKLINE_ENCRYPTION_KEY", keyring)
            .args(["migrate"])
            .output()
            .await
            .expect("run hookline");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
    }
    assert_eq!(raw_store(&env).await, before, "rows changed");
    env.finish().await;
}
