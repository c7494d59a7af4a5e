//! Secrets at rest on both adapters: the `SealedRegistry` decorator writes only sealed
//! values and reads plaintext; the walk seals rows written before sealing, re-seals
//! every row under a new key, refuses a key it lacks, and never overwrites a row that
//! changed since it was read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use hookline_core::client_cert::ClientIdentity;
use hookline_core::model::{PayloadFormat, SubscriptionSecret, SubscriptionState};
use hookline_core::{Id, IdKind};
use hookline_seal::{Keyring, SealError};
use hookline_store::sealing::{self, SEALED_COLUMNS, SealedRows, SealingError, Walk};
use hookline_store::{NewSubscription, PgStore, RegistryStore, SealedRegistry, SqliteStore};
use hookline_testkit::{TestDb, unique_name};

const SECRET: &str = "whsec_c2VhbGVkLXN0b3JlLXRlc3Qtc2VjcmV0LTAx";
const ROTATED: &str = "whsec_c2VhbGVkLXN0b3JlLXRlc3Qtc2VjcmV0LTAy";
const BEARER: &str = "Bearer store-sealing-test";
const CLIENT_KEY: &str = "-----BEGIN PRIVATE KEY-----store-sealing-test-key";

fn ring(spec: &str) -> Arc<Keyring> {
    Arc::new(Keyring::parse(spec).expect("keyring"))
}

fn key(id: &str) -> String {
    Keyring::generate_spec(id).unwrap().trim().to_string()
}

fn secret(sub: &Id, value: &str) -> SubscriptionSecret {
    SubscriptionSecret {
        id: Id::new(IdKind::Secret),
        subscription_id: sub.clone(),
        secret: value.into(),
        created_at: Utc::now(),
        expires_at: None,
    }
}

async fn subscription(store: &dyn RegistryStore) -> Id {
    let tenant = Id::new(IdKind::Tenant);
    store
        .create_tenant(&tenant, "acme", &BTreeMap::new())
        .await
        .expect("tenant");
    let id = Id::new(IdKind::Subscription);
    let new = NewSubscription {
        ordering: Default::default(),
        secret: secret(&id, SECRET),
        id: id.clone(),
        tenant_id: tenant,
        url: "https://receiver.example/hooks".into(),
        description: String::new(),
        event_types: vec![],
        channels: vec![],
        headers: BTreeMap::from([
            ("Authorization".into(), BEARER.into()),
            ("X-Team".into(), "billing".into()),
        ]),
        rate_limit_per_second: None,
        max_in_flight: None,
        retry_schedule: Some(vec![Duration::from_secs(1)]),
        state: SubscriptionState::Enabled,
        metadata: BTreeMap::new(),
        payload_format: PayloadFormat::Raw,
        client_identity: Some(ClientIdentity {
            certificate_pem: "-----BEGIN CERTIFICATE-----public".into(),
            private_key_pem: CLIENT_KEY.into(),
        }),
    };
    store.create_subscription(&new).await.expect("subscription");
    store
        .rotate_secret(&secret(&id, ROTATED), Utc::now() + TimeDelta::hours(1))
        .await
        .expect("rotate");
    id
}

/// Every stored value of every sealed column, raw.
async fn raw(rows: &dyn SealedRows) -> Vec<String> {
    let mut all = Vec::new();
    for col in SEALED_COLUMNS {
        for (_, v) in rows.page(col, "", 1000).await.expect("page") {
            all.push(v);
        }
    }
    all
}

/// Plaintext through the decorator, whatever the rows hold.
async fn assert_reads_plaintext(store: &dyn RegistryStore, id: &Id) {
    let sub = store.get_subscription(id).await.expect("get");
    assert_eq!(sub.headers["Authorization"], BEARER);
    assert_eq!(sub.headers["X-Team"], "billing");
    let live: Vec<_> = store
        .live_secrets(id, Utc::now())
        .await
        .expect("live")
        .into_iter()
        .map(|s| s.secret)
        .collect();
    assert_eq!(live, vec![ROTATED.to_string(), SECRET.to_string()]);
    let identities = store
        .client_identities(std::slice::from_ref(id))
        .await
        .expect("identities");
    assert_eq!(identities[id].private_key_pem, CLIENT_KEY);
    let current = store
        .current_secrets(std::slice::from_ref(id))
        .await
        .expect("current");
    assert_eq!(current[id].secret, ROTATED);
}

fn assert_sealed_under(values: &[String], id: &str) {
    let joined = values.join(" ");
    for clear in [SECRET, ROTATED, BEARER, "billing", CLIENT_KEY] {
        assert!(!joined.contains(clear), "{clear} in clear: {joined}");
    }
    assert!(joined.contains(&format!("hlsealed:v1:{id}:")), "{joined}");
    assert!(
        !values
            .iter()
            .any(|v| v.contains("hlsealed:v1:") && !v.contains(id))
    );
}

async fn rows_written_before_are_sealed_then_rotated<S>(store: Arc<S>)
where
    S: RegistryStore + SealedRows,
{
    // Written before sealing existed: plaintext.
    let id = subscription(store.as_ref()).await;
    assert!(raw(store.as_ref()).await.join(" ").contains(BEARER));
    let (k1, k2) = (key("k1"), key("k2"));

    let report = sealing::walk(store.as_ref(), &ring(&k1), Walk::SealPlain)
        .await
        .expect("seal");
    assert_eq!(
        report.rewritten, 4,
        "two secrets, one headers row and one client key"
    );
    assert_sealed_under(&raw(store.as_ref()).await, "k1");
    let again = sealing::walk(store.as_ref(), &ring(&k1), Walk::SealPlain)
        .await
        .expect("seal again");
    assert_eq!(again.rewritten, 0);
    assert_reads_plaintext(&SealedRegistry::new(store.clone(), ring(&k1)), &id).await;

    // Rotation: k2 current, k1 still opens; afterwards k2 alone reads everything.
    let both = ring(&format!("{k2},{k1}"));
    let rotated = sealing::walk(store.as_ref(), &both, Walk::Rotate)
        .await
        .expect("rotate");
    assert_eq!(rotated.rewritten, 4);
    assert_sealed_under(&raw(store.as_ref()).await, "k2");
    assert_reads_plaintext(&SealedRegistry::new(store.clone(), ring(&k2)), &id).await;
    let survey = sealing::survey(store.as_ref()).await.expect("survey");
    assert_eq!(
        survey.into_iter().collect::<Vec<_>>(),
        vec!["k2".to_string()]
    );

    // A keyring without k2 is refused by name, and so is another key under id k2.
    let before = raw(store.as_ref()).await;
    match sealing::walk(store.as_ref(), &ring(&k1), Walk::SealPlain).await {
        Err(SealingError::Seal { source, .. }) => {
            assert_eq!(source, SealError::UnknownKey("k2".into()))
        }
        other => panic!("expected an unknown key, got {other:?}"),
    }
    match sealing::walk(store.as_ref(), &ring(&key("k2")), Walk::SealPlain).await {
        Err(SealingError::Seal { source, .. }) => {
            assert_eq!(source, SealError::Corrupt("k2".into()))
        }
        other => panic!("expected a damaged value, got {other:?}"),
    }
    assert_eq!(raw(store.as_ref()).await, before);
}

async fn the_decorator_writes_only_sealed_values<S>(store: Arc<S>)
where
    S: RegistryStore + SealedRows,
{
    let k1 = key("k1");
    let sealed = SealedRegistry::new(store.clone(), ring(&k1));
    let id = subscription(&sealed).await;
    assert_sealed_under(&raw(store.as_ref()).await, "k1");
    assert_reads_plaintext(&sealed, &id).await;

    let mut sub = sealed.get_subscription(&id).await.expect("get");
    sub.headers
        .insert("X-Token".into(), "updated-token-value".into());
    let updated = sealed.update_subscription(&sub).await.expect("update");
    assert_eq!(updated.headers["X-Token"], "updated-token-value");
    let stored = raw(store.as_ref()).await.join(" ");
    assert!(!stored.contains("updated-token-value"), "{stored}");

    // A value that changed since it was read is not overwritten.
    let col = &SEALED_COLUMNS[0];
    let (row, value) = store.page(col, "", 1).await.expect("page").remove(0);
    let stale = (row, "stale".to_string(), "x".to_string());
    assert_eq!(store.swap(col, &[stale]).await.expect("swap"), 0);
    assert_eq!(store.page(col, "", 1).await.expect("page")[0].1, value);
}

async fn on_postgres(case: impl AsyncFnOnce(Arc<PgStore>)) {
    let db = TestDb::create().await;
    let store = Arc::new(PgStore::connect(db.url(), 2).await.expect("connect"));
    store.migrate().await.expect("migrate");
    case(store.clone()).await;
    store.close().await;
    db.drop_db().await;
}

async fn on_sqlite(case: impl AsyncFnOnce(Arc<SqliteStore>)) {
    let dir = std::env::temp_dir().join(unique_name("hookline-sealing-"));
    std::fs::create_dir_all(&dir).expect("dir");
    let store = Arc::new(
        SqliteStore::open(&dir.join("hookline.db"))
            .await
            .expect("open"),
    );
    store.migrate().await.expect("migrate");
    case(store.clone()).await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn postgres_rows_written_before_are_sealed_then_rotated() {
    on_postgres(rows_written_before_are_sealed_then_rotated).await;
}

#[tokio::test]
async fn sqlite_rows_written_before_are_sealed_then_rotated() {
    on_sqlite(rows_written_before_are_sealed_then_rotated).await;
}

#[tokio::test]
async fn postgres_the_decorator_writes_only_sealed_values() {
    on_postgres(the_decorator_writes_only_sealed_values).await;
}

#[tokio::test]
async fn sqlite_the_decorator_writes_only_sealed_values() {
    on_sqlite(the_decorator_writes_only_sealed_values).await;
}
