//! `hookline bench` end to end: a very short run of the `single` scenario, spawning
//! `hookline serve` on the machine's PostgreSQL and RabbitMQ, must deliver every event
//! it published, verify every signature and drop its fresh database afterwards.
//! Timing figures are benchmark output, never assertions.

use std::process::Stdio;

use serde_json::Value;
use sqlx::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_hookline");

#[tokio::test(flavor = "multi_thread")]
async fn a_short_single_run_delivers_every_event_and_cleans_up() {
    let out = tokio::process::Command::new(BIN)
        .args([
            "bench",
            "--scenario",
            "single",
            "--events",
            "200",
            "--publishers",
            "4",
        ])
        .args(["--verify", "--drain-timeout", "60", "--json"])
        .env("HOOKLINE_DATABASE_URL", hookline_testkit::admin_url())
        .env("HOOKLINE_AMQP_URL", hookline_testkit::amqp_url())
        .env("HOOKLINE_DATABASE_MAX_CONNECTIONS", "4")
        .env("HOOKLINE_LOG", "warn")
        .env_remove("HOOKLINE_CONFIG")
        .env_remove("HOOKLINE_SERVER")
        .env_remove("HOOKLINE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run hookline bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hookline bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let run = &report["runs"][0];
    assert_eq!(report["runs"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(run["target"]["kind"], "spawned", "{report}");
    assert_eq!(run["publish"]["events_accepted"], 200, "{report}");
    assert_eq!(run["publish"]["errors"], 0, "{report}");
    let d = &run["deliveries"];
    assert_eq!(d["expected"], 200, "{report}");
    assert_eq!(d["delivered"], 200, "{report}");
    assert_eq!(d["complete"], true, "{report}");
    assert_eq!(d["latency_ms"]["count"], 200, "{report}");
    for zero in [
        "unknown_events",
        "verify_failures",
        "unexpected_requests",
        "bad_webhook_ids",
        "fanout_mismatches",
        "bad_event_ids",
    ] {
        assert_eq!(d[zero], 0, "{zero}: {report}");
    }

    // The fresh database is named in the backend description and is gone afterwards.
    let backend = run["target"]["backend"].as_str().unwrap_or_default();
    let name = backend
        .split(['/', ' ', '?'])
        .find(|w| w.starts_with("hookline_bench_"))
        .unwrap_or_else(|| panic!("no fresh database in {backend:?}"));
    let mut conn = sqlx::PgConnection::connect(&hookline_testkit::admin_url())
        .await
        .expect("connect to PostgreSQL");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("query pg_database");
    let _ = conn.close().await;
    assert_eq!(left, 0, "database {name} was not dropped");
}

#[tokio::test]
async fn list_names_every_scenario() {
    let out = tokio::process::Command::new(BIN)
        .args(["bench", "--list"])
        .output()
        .await
        .expect("run hookline bench --list");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["single", "fanout10", "batch100", "fail1pct", "hanging"] {
        assert!(text.contains(name), "{name} missing from {text}");
    }
}
