//! Test helpers shared by every Hookline crate: a fresh PostgreSQL database per test, unique
//! names for broker queues and exchanges, and the broker's URL.
//!
//! Tests run against real PostgreSQL and RabbitMQ, in parallel, so each test needs its own
//! database and its own queue names. This crate knows nothing of Hookline's schema (it does
//! not depend on `hookline-store`), so any crate can take it as a dev-dependency.
//!
//! A test that panics before [`TestDb::drop_db`] still drops its database from `Drop`; one
//! that is killed leaks it, and the next [`TestDb::create`] sweeps `hl_test_` databases older
//! than [`LEAK_AGE`] (the ULID in the name says when a database was made).

mod listener;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use ulid::Ulid;
use url::Url;

pub use listener::CountingListener;

/// The server tests connect to, unless `HOOKLINE_TEST_DATABASE_URL` says otherwise.
pub const DEFAULT_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";
/// The broker tests connect to, unless `HOOKLINE_TEST_AMQP_URL` says otherwise.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Every test database's name starts with this.
pub const DB_PREFIX: &str = "hl_test_";
/// Test databases older than this are taken as leaked and dropped by the sweep.
pub const LEAK_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// `prefix` followed by a fresh lowercase ULID: unique across tests and runs, time-ordered.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}", Ulid::new().to_string().to_lowercase())
}

/// The AMQP URL of the test broker (`HOOKLINE_TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("HOOKLINE_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_string())
}

/// The URL of the administrative database (`HOOKLINE_TEST_DATABASE_URL`), with
/// `sslmode=disable` added when it names no sslmode (sqlx 0.9.0 stalls over TLS on loopback).
pub fn admin_url() -> String {
    let raw = std::env::var("HOOKLINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string());
    let mut url = Url::parse(&raw)
        .unwrap_or_else(|e| panic!("HOOKLINE_TEST_DATABASE_URL {raw:?} is not a URL: {e}"));
    if !url.query_pairs().any(|(k, _)| k == "sslmode") {
        url.query_pairs_mut().append_pair("sslmode", "disable");
    }
    url.to_string()
}

/// A database of its own for one test. Drop it with [`TestDb::drop_db`] at the end of the
/// test, after closing every pool on it.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    dropped: bool,
}

impl TestDb {
    /// Creates an empty database `hl_test_<lowercase ulid>` on the test server, after sweeping
    /// databases leaked by earlier runs. Panics with the reason if the server is unreachable.
    pub async fn create() -> TestDb {
        let admin_url = admin_url();
        let name = unique_name(DB_PREFIX);
        let mut url = Url::parse(&admin_url)
            .unwrap_or_else(|e| panic!("test database URL {admin_url:?} is not a URL: {e}"));
        url.set_path(&format!("/{name}"));

        let mut conn = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot connect to the test PostgreSQL at {admin_url}: {e} (set HOOKLINE_TEST_DATABASE_URL)")
        });
        sweep_leaked(&mut conn).await;
        conn.execute(AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&name)
        )))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = conn.close().await;

        TestDb {
            name,
            url: url.to_string(),
            admin_url,
            dropped: false,
        }
    }

    /// The URL of this test's database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (`hl_test_…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database, terminating whatever connections are still open on it.
    pub async fn drop_db(mut self) {
        self.dropped = true;
        if let Err(e) = drop_database(&self.admin_url, &self.name).await {
            eprintln!(
                "hookline-testkit: could not drop test database {}: {e}",
                self.name
            );
        }
    }
}

impl Drop for TestDb {
    /// The fallback for a test that panicked before `drop_db`: drop the database from a
    /// thread with a runtime of its own (a destructor cannot await, and may run on a
    /// runtime thread that must not be blocked on itself).
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let worker = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => {
                    if let Err(e) = rt.block_on(drop_database(&admin_url, &name)) {
                        eprintln!("hookline-testkit: could not drop test database {name}: {e}");
                    }
                }
                Err(e) => eprintln!("hookline-testkit: no runtime to drop {name}: {e}"),
            }
        });
        let _ = worker.join();
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect(admin_url).await?;
    let result = conn
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        )))
        .await;
    let _ = conn.close().await;
    result.map(|_| ())
}

/// Drops `hl_test_` databases made more than [`LEAK_AGE`] ago. Best effort: a database
/// another sweep dropped first, or any other failure, is reported and skipped.
async fn sweep_leaked(conn: &mut PgConnection) {
    let names: Vec<String> = match sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'hl\\_test\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    {
        Ok(names) => names,
        Err(e) => {
            eprintln!("hookline-testkit: cannot list test databases: {e}");
            return;
        }
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    for name in names {
        let Some(created_ms) = created_at_ms(&name) else {
            continue;
        };
        if now_ms.saturating_sub(u128::from(created_ms)) < LEAK_AGE.as_millis() {
            continue;
        }
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&name)
        );
        if let Err(e) = conn.execute(AssertSqlSafe(sql)).await {
            eprintln!("hookline-testkit: cannot drop leaked test database {name}: {e}");
        }
    }
}

/// When a test database was made, from the ULID in its name.
fn created_at_ms(name: &str) -> Option<u64> {
    let ulid = name.strip_prefix(DB_PREFIX)?;
    Ulid::from_string(&ulid.to_uppercase())
        .ok()
        .map(|u| u.timestamp_ms())
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_lowercase_and_distinct() {
        let a = unique_name("q_");
        let b = unique_name("q_");
        assert_ne!(a, b);
        assert!(a.starts_with("q_"));
        assert_eq!(a, a.to_lowercase());
        assert_eq!(a.len(), 2 + 26);
    }

    #[test]
    fn the_creation_time_is_read_back_from_the_name() {
        let ulid = Ulid::from_parts(1_700_000_000_000, 42);
        let name = format!("{DB_PREFIX}{}", ulid.to_string().to_lowercase());
        assert_eq!(created_at_ms(&name), Some(1_700_000_000_000));
        assert_eq!(created_at_ms("hl_test_garbage"), None);
        assert_eq!(created_at_ms("other"), None);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    async fn exists(name: &str) -> bool {
        let mut admin = PgConnection::connect(&admin_url()).await.expect("connect");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut admin)
                .await
                .expect("query");
        admin.close().await.expect("close");
        exists
    }

    #[tokio::test]
    async fn a_forgotten_database_is_dropped_by_drop() {
        let db = TestDb::create().await;
        let name = db.name().to_string();
        assert!(exists(&name).await);
        drop(db);
        assert!(!exists(&name).await);
    }

    #[tokio::test]
    async fn leaked_databases_older_than_two_hours_are_swept() {
        let three_hours_ago = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
            - 3 * 60 * 60 * 1000;
        let old = format!(
            "{DB_PREFIX}{}",
            Ulid::from_parts(three_hours_ago, rand_bits())
                .to_string()
                .to_lowercase()
        );
        let mut admin = PgConnection::connect(&admin_url()).await.expect("connect");
        admin
            .execute(AssertSqlSafe(format!(
                "CREATE DATABASE {}",
                quote_ident(&old)
            )))
            .await
            .expect("create old");
        admin.close().await.expect("close");

        let fresh = TestDb::create().await;
        assert!(!exists(&old).await, "the leaked database was swept");
        assert!(exists(fresh.name()).await, "fresh ones are left alone");
        fresh.drop_db().await;
    }

    fn rand_bits() -> u128 {
        Ulid::new().random()
    }

    #[tokio::test]
    async fn a_test_database_can_be_created_used_and_dropped() {
        let db = TestDb::create().await;
        assert!(db.url().contains(db.name()));
        assert!(db.url().contains("sslmode=disable"));
        let mut conn = PgConnection::connect(db.url()).await.expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .expect("query");
        assert_eq!(one, 1);
        conn.close().await.expect("close");
        let name = db.name().to_string();
        db.drop_db().await;
        assert!(!exists(&name).await);
    }
}
