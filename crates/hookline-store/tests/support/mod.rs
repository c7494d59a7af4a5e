//! What the store's test files share: one fixture that gives a test body either adapter.
//!
//! Services see the storage port only, so both adapters must pass the very same tests.
//! A test is written once, as `async fn case(fx: &Fixture)`, against [`Fixture::store`] (an
//! a `dyn Store`, the four port traits in one); [`on_both_backends!`] makes a
//! `case::postgres` and a `case::sqlite` test of it. The few looks a test takes behind the
//! port (counting rows, expiring a lease by hand) go through the fixture, which knows each
//! backend's SQL.
//!
//! PostgreSQL tests get a database of their own (hookline-testkit); SQLite tests a fresh
//! file in a directory of their own under the system temp dir, removed at the end (also
//! when the test panics).

#![allow(dead_code)] // each test file uses its own part of this module

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

use hookline_core::model::{SubscriptionSecret, SubscriptionState};
use hookline_core::{Id, IdKind};
use hookline_store::NewSubscription;
use hookline_store::{DeliveryStore, EventStore, PgStore, RegistryStore, SqliteStore, StoreHealth};
use hookline_testkit::{TestDb, unique_name};

/// Every port trait in one, so that a test body can hold either adapter as a trait object.
pub trait Store: RegistryStore + StoreHealth + EventStore + DeliveryStore {}
impl<T: RegistryStore + StoreHealth + EventStore + DeliveryStore> Store for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A migrated store on a fresh database, and what a test needs to look behind the port.
pub struct Fixture {
    store: Arc<dyn Store>,
    inner: Inner,
}

enum Inner {
    Postgres { db: TestDb, store: PgStore },
    Sqlite { dir: TempDir, store: SqliteStore },
}

impl Fixture {
    /// A fresh, migrated store. `connections` sizes the PostgreSQL pool (the server's
    /// connections are shared by every test); SQLite's pools are fixed by the adapter.
    pub async fn new(backend: Backend, connections: u32) -> Fixture {
        match backend {
            Backend::Postgres => {
                let db = TestDb::create().await;
                let store = PgStore::connect(db.url(), connections)
                    .await
                    .expect("connect");
                store.migrate().await.expect("migrate");
                Fixture {
                    store: Arc::new(store.clone()),
                    inner: Inner::Postgres { db, store },
                }
            }
            Backend::Sqlite => {
                let dir = TempDir::new();
                let store = SqliteStore::open(&dir.db_path()).await.expect("open");
                store.migrate().await.expect("migrate");
                Fixture {
                    store: Arc::new(store.clone()),
                    inner: Inner::Sqlite { dir, store },
                }
            }
        }
    }

    /// The store under test.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The store under test, to share with spawned tasks.
    pub fn shared(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The PostgreSQL store's pool (None on SQLite), for a look behind the port.
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.inner {
            Inner::Postgres { store, .. } => Some(store.pool()),
            Inner::Sqlite { .. } => None,
        }
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Postgres { .. } => Backend::Postgres,
            Inner::Sqlite { .. } => Backend::Sqlite,
        }
    }

    /// Closes the store's pools (the database stays, for `teardown`): every call after this
    /// finds the database unreachable.
    pub async fn close_store(&self) {
        match &self.inner {
            Inner::Postgres { store, .. } => store.close().await,
            Inner::Sqlite { store, .. } => store.close().await,
        }
    }

    /// Closes the store and removes its database. Every clone of the store handed to a task
    /// must be gone by now.
    pub async fn teardown(self) {
        drop(self.store);
        match self.inner {
            Inner::Postgres { db, store } => {
                store.close().await;
                db.drop_db().await;
            }
            Inner::Sqlite { dir, store } => {
                store.close().await;
                drop(dir);
            }
        }
    }

    /// Runs a statement of each backend's dialect with text parameters (`$1`, `$2`, … in
    /// both: sqlx binds SQLite's `$N` by number too).
    pub async fn execute(&self, postgres: &str, sqlite: &str, params: &[&str]) {
        match &self.inner {
            Inner::Postgres { store, .. } => {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(postgres.to_string()));
                for p in params {
                    q = q.bind(*p);
                }
                q.execute(store.pool()).await.expect(postgres);
            }
            Inner::Sqlite { store, .. } => {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sqlite.to_string()));
                for p in params {
                    q = q.bind(*p);
                }
                q.execute(store.pool()).await.expect(sqlite);
            }
        }
    }

    /// Rows in `table`.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
        match &self.inner {
            Inner::Postgres { store, .. } => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
            Inner::Sqlite { store, .. } => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
        }
        .expect("count")
    }

    /// The delivery ids in the outbox.
    pub async fn outbox(&self) -> HashSet<String> {
        let sql = "SELECT delivery_id FROM delivery_outbox";
        match &self.inner {
            Inner::Postgres { store, .. } => sqlx::query_scalar(sql).fetch_all(store.pool()).await,
            Inner::Sqlite { store, .. } => sqlx::query_scalar(sql).fetch_all(store.pool()).await,
        }
        .expect("outbox")
        .into_iter()
        .collect()
    }

    /// The retry-schedule row of a delivery: (due_at, attempt_number).
    pub async fn schedule(&self, delivery_id: &Id) -> Option<(DateTime<Utc>, i32)> {
        match &self.inner {
            Inner::Postgres { store, .. } => sqlx::query_as(
                "SELECT due_at, attempt_number FROM retry_schedule WHERE delivery_id = $1",
            )
            .bind(delivery_id.as_str())
            .fetch_optional(store.pool())
            .await
            .expect("schedule"),
            Inner::Sqlite { store, .. } => {
                let row: Option<(i64, i64)> = sqlx::query_as(
                    "SELECT due_at, attempt_number FROM retry_schedule WHERE delivery_id = ?1",
                )
                .bind(delivery_id.as_str())
                .fetch_optional(store.pool())
                .await
                .expect("schedule");
                row.map(|(due, n)| (from_micros(due), i32::try_from(n).expect("i32")))
            }
        }
    }

    /// When an API key was last used.
    pub async fn last_used_at(&self, key_id: &Id) -> Option<DateTime<Utc>> {
        match &self.inner {
            Inner::Postgres { store, .. } => {
                sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = $1")
                    .bind(key_id.as_str())
                    .fetch_one(store.pool())
                    .await
                    .expect("last used")
            }
            Inner::Sqlite { store, .. } => {
                let micros: Option<i64> =
                    sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = ?1")
                        .bind(key_id.as_str())
                        .fetch_one(store.pool())
                        .await
                        .expect("last used");
                micros.map(from_micros)
            }
        }
    }

    /// Runs the migrations again through the store under test.
    pub async fn migrate(&self) -> Result<(), hookline_store::StoreError> {
        match &self.inner {
            Inner::Postgres { store, .. } => store.migrate().await,
            Inner::Sqlite { store, .. } => store.migrate().await,
        }
    }

    /// Migrations recorded as applied.
    /// How many migrations this backend has (every one must end up applied).
    pub fn known_migrations(&self) -> i64 {
        let count = match &self.inner {
            Inner::Postgres { .. } => hookline_store::postgres::MIGRATOR.iter().count(),
            Inner::Sqlite { .. } => hookline_store::sqlite::MIGRATOR.iter().count(),
        };
        i64::try_from(count).expect("a small count")
    }

    pub async fn applied_migrations(&self) -> i64 {
        let sql = "SELECT count(*) FROM _sqlx_migrations WHERE success";
        match &self.inner {
            Inner::Postgres { store, .. } => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
            Inner::Sqlite { store, .. } => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
        }
        .expect("count migrations")
    }

    /// Opens a second store on the same database, migrates through it, and closes it.
    pub async fn migrate_from_another_pool(&self) {
        match &self.inner {
            Inner::Postgres { db, .. } => {
                let other = PgStore::connect(db.url(), 1).await.expect("connect");
                other.migrate().await.expect("migrate from another pool");
                other.close().await;
            }
            Inner::Sqlite { dir, .. } => {
                let other = SqliteStore::open(&dir.db_path()).await.expect("open");
                other.migrate().await.expect("migrate from another pool");
                other.close().await;
            }
        }
    }
}

fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).expect("timestamp in range")
}

/// A directory of its own for one test, removed when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(unique_name("hookline-store-test-"));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database file of the test.
    pub fn db_path(&self) -> PathBuf {
        self.path.join("hookline.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Makes a `postgres` and a `sqlite` test of each `async fn case(fx: &Fixture)`, in a module
/// named after the case. `connections` sizes the PostgreSQL pool; `multi_thread` runs the
/// test on a runtime of two worker threads (for races).
///
/// ```ignore
/// on_both_backends! {
///     current_thread insert_events_stores_events(3);
///     multi_thread racing_publishes_store_one_event(8);
/// }
/// ```
#[macro_export]
macro_rules! on_both_backends {
    ($($flavor:ident $case:ident($connections:expr);)*) => {
        $( $crate::on_both_backends!(@case $flavor $case $connections); )*
    };
    (@case current_thread $case:ident $connections:expr) => {
        mod $case {
            use super::*;
            #[tokio::test]
            async fn postgres() {
                let fx = Fixture::new(Backend::Postgres, $connections).await;
                super::$case(&fx).await;
                fx.teardown().await;
            }
            #[tokio::test]
            async fn sqlite() {
                let fx = Fixture::new(Backend::Sqlite, $connections).await;
                super::$case(&fx).await;
                fx.teardown().await;
            }
        }
    };
    (@case multi_thread $case:ident $connections:expr) => {
        mod $case {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let fx = Fixture::new(Backend::Postgres, $connections).await;
                super::$case(&fx).await;
                fx.teardown().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let fx = Fixture::new(Backend::Sqlite, $connections).await;
                super::$case(&fx).await;
                fx.teardown().await;
            }
        }
    };
}

/// An enabled subscription of `tenant_id` to a receiver URL, with a fixed secret and no
/// client certificate: what a test needs when the subscription itself is not the point.
/// Creates a tenant named `t` and returns its id.
pub async fn tenant(store: &dyn Store) -> Id {
    let id = Id::new(IdKind::Tenant);
    store
        .create_tenant(&id, "t", &BTreeMap::new())
        .await
        .expect("create tenant");
    id
}

pub fn new_subscription(tenant_id: &Id) -> NewSubscription {
    let id = Id::new(IdKind::Subscription);
    NewSubscription {
        ordering: Default::default(),
        client_identity: None,
        payload_format: Default::default(),
        secret: SubscriptionSecret {
            id: Id::new(IdKind::Secret),
            subscription_id: id.clone(),
            secret: "whsec_c2VjcmV0LW9uZS1zZWNyZXQtb25lLXNlY3JldA==".into(),
            created_at: Utc::now(),
            expires_at: None,
        },
        id,
        tenant_id: tenant_id.clone(),
        url: "https://receiver.example/hooks".into(),
        description: String::new(),
        event_types: vec![],
        channels: vec![],
        headers: BTreeMap::new(),
        rate_limit_per_second: None,
        max_in_flight: None,
        retry_schedule: None,
        state: SubscriptionState::Enabled,
        metadata: BTreeMap::new(),
    }
}
