//! `hookline bench` end to end: a very short run of the `single` scenario, spawning
//! `hookline serve` on the machine's PostgreSQL and RabbitMQ, must deliver every event
//! it published, verify every signature and drop its fresh database afterwards.
//! Timing figures are benchmark output, never assertions.
//!
//! On both backends: a very short external-mode run (nginx and h2load, which `.ci/run`
//! installs) must count every delivery the server created from nginx's access log and
//! report CPU for the server, the receiver and the load generator; a very short `noisy`
//! run must deliver all of tenant A's burst and every one of tenant B's events and
//! measure B's latency.

use std::process::Stdio;

use serde_json::Value;
use sqlx::Connection;

#[macro_use]
mod support;
use support::Backend;

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
    for name in [
        "single", "fanout10", "batch100", "fail1pct", "hanging", "noisy", "ordered",
    ] {
        assert!(text.contains(name), "{name} missing from {text}");
    }
}

/// `hookline bench <args> --json` on `backend`; the report.
async fn bench_json(backend: Backend, args: &[&str]) -> Value {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("bench")
        .args(args)
        .arg("--json")
        .env("HOOKLINE_DATABASE_MAX_CONNECTIONS", "4")
        .env("HOOKLINE_LOG", "warn")
        .env_remove("HOOKLINE_CONFIG")
        .env_remove("HOOKLINE_SERVER")
        .env_remove("HOOKLINE_TOKEN")
        .stdin(Stdio::null());
    match backend {
        Backend::Distributed => cmd
            .env("HOOKLINE_DATABASE_URL", hookline_testkit::admin_url())
            .env("HOOKLINE_AMQP_URL", hookline_testkit::amqp_url()),
        Backend::Embedded => cmd
            .env_remove("HOOKLINE_DATABASE_URL")
            .env_remove("HOOKLINE_AMQP_URL"),
    };
    let out = cmd.output().await.expect("run hookline bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hookline bench {args:?} failed: {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn an_external_run_counts_every_delivery_from_nginx(backend: Backend) {
    for tool in ["nginx", "h2load"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is not installed: apt-get install nginx-light nghttp2-client (.ci/run does)"
        );
    }
    let args = [
        "--external",
        "--scenario",
        "fanout10",
        "--fanout",
        "3",
        "--events",
        "300",
        "--connections",
        "4",
        "--drain-timeout",
        "60",
    ];
    let report = bench_json(backend, &args).await;
    assert_eq!(
        report["mode"].as_str().map(|m| m.starts_with("external")),
        Some(true)
    );
    let run = &report["runs"][0];
    assert_eq!(run["events_accepted"], 300, "{report}");
    let d = &run["deliveries"];
    assert_eq!(d["expected"], 900, "{report}");
    assert_eq!(d["delivered"], 900, "{report}");
    assert_eq!(d["complete"], true, "{report}");
    assert_eq!(d["unexpected_requests"], 0, "{report}");
    assert_eq!(d["latency_ms"]["count"], 900, "{report}");
    let labels: Vec<&str> = run["processes"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["label"].as_str()).collect())
        .unwrap_or_default();
    for want in [
        "hookline serve",
        "receiver: nginx",
        "load generator: h2load",
    ] {
        assert!(
            labels.iter().any(|l| l.starts_with(want)),
            "{want}: {report}"
        );
    }
    assert!(
        run["cpu_us_per_delivery_all"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{report}"
    );
    assert!(
        run["server_peak_rss_mib"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
}

async fn a_short_noisy_run_delivers_both_tenants_and_measures_b(backend: Backend) {
    let args = [
        "--scenario",
        "noisy",
        "--burst",
        "2000",
        "--no-compare",
        "--drain-timeout",
        "120",
    ];
    let report = bench_json(backend, &args).await;
    assert_eq!(
        report["mode"], "in-process (harness shares the CPU)",
        "{report}"
    );
    let run = &report["runs"][0];
    assert_eq!(run["with_b"], true, "{report}");
    assert_eq!(run["a"]["deliveries_expected"], 2000, "{report}");
    assert_eq!(run["a"]["delivered"], 2000, "{report}");
    assert_eq!(run["a"]["complete"], true, "{report}");
    let b = &run["b"];
    assert_eq!(b["errors"], 0, "{report}");
    assert!(
        b["events_accepted"].as_u64().is_some_and(|n| n >= 1),
        "{report}"
    );
    assert_eq!(b["delivered"], b["events_accepted"], "{report}");
    assert_eq!(b["latency_ms"]["count"], b["delivered"], "{report}");
}

on_both_backends!(
    an_external_run_counts_every_delivery_from_nginx,
    a_short_noisy_run_delivers_both_tenants_and_measures_b,
);
