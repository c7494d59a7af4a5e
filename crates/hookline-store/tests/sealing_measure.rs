//! How long sealing takes (ignored: a measurement, not a check). 10,000 subscriptions
//! with two header values and 10,000 plaintext secrets, on both adapters:
//!
//!     cargo test -p hookline-store --test sealing_measure -- --ignored --nocapture

use hookline_seal::Keyring;
use hookline_store::sealing::{self, Walk};
use hookline_store::{PgStore, SqliteStore};
use hookline_testkit::{TestDb, unique_name};
use std::sync::Arc;
use std::time::Instant;

const N: i64 = 10_000;

fn ring(s: &str) -> Keyring {
    Keyring::parse(s).unwrap()
}

async fn go<S: hookline_store::sealing::SealedRows>(name: &str, s: &S) {
    let k1 = Keyring::generate_spec("k1").unwrap().trim().to_string();
    let k2 = Keyring::generate_spec("k2").unwrap().trim().to_string();
    let t = Instant::now();
    let r = sealing::walk(s, &ring(&k1), Walk::SealPlain).await.unwrap();
    println!(
        "{name}: seal plaintext {} rows -> {} rewritten in {:?}",
        r.rows,
        r.rewritten,
        t.elapsed()
    );
    let t = Instant::now();
    let r = sealing::walk(s, &ring(&k1), Walk::SealPlain).await.unwrap();
    println!(
        "{name}: start-up check {} rows ({} rewritten) in {:?}",
        r.rows,
        r.rewritten,
        t.elapsed()
    );
    let t = Instant::now();
    let r = sealing::walk(s, &ring(&format!("{k2},{k1}")), Walk::Rotate)
        .await
        .unwrap();
    println!(
        "{name}: rotate {} rows -> {} rewritten in {:?}",
        r.rows,
        r.rewritten,
        t.elapsed()
    );
}

const FILL: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {N}) ";

#[tokio::test]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn measure() {
    let db = TestDb::create().await;
    let pg = PgStore::connect(db.url(), 2).await.unwrap();
    pg.migrate().await.unwrap();
    let p = pg.pool();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ('ten_1','t')")
        .execute(p)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO subscriptions (id, tenant_id, url, headers) SELECT 'sub_'||lpad(i::text,8,'0'), 'ten_1', 'https://x.example/', '{{\"Authorization\":\"Bearer abcdefghijkl\",\"X-Team\":\"billing\"}}' FROM generate_series(1,{N}) i"))).execute(p).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO subscription_secrets (id, subscription_id, secret) SELECT 'sec_'||lpad(i::text,8,'0'), 'sub_'||lpad(i::text,8,'0'), 'whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0' FROM generate_series(1,{N}) i"))).execute(p).await.unwrap();
    go("postgres", &pg).await;
    pg.close().await;
    db.drop_db().await;

    let dir = std::env::temp_dir().join(unique_name("hl-measure-"));
    std::fs::create_dir_all(&dir).unwrap();
    let lite = Arc::new(SqliteStore::open(&dir.join("hookline.db")).await.unwrap());
    lite.migrate().await.unwrap();
    let p = lite.pool();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ('ten_1','t')")
        .execute(p)
        .await
        .unwrap();
    let fill = FILL.replace("{N}", &N.to_string());
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO subscriptions (id, tenant_id, url, headers) {fill} SELECT printf('sub_%08d', i), 'ten_1', 'https://x.example/', '{{\"Authorization\":\"Bearer abcdefghijkl\",\"X-Team\":\"billing\"}}' FROM n"))).execute(p).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO subscription_secrets (id, subscription_id, secret) {fill} SELECT printf('sec_%08d', i), printf('sub_%08d', i), 'whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0' FROM n"))).execute(p).await.unwrap();
    go("sqlite", lite.as_ref()).await;
    lite.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
