//! Deferral and circuit state that users can see, with the real binary on both backends:
//! an endpoint that keeps failing opens its subscription's circuit; then
//! `deliveries get`/`list` say the delivery is deferred (`circuit_open`, until when, the
//! last attempt's error kept), `subscriptions get` says until when the circuit is open,
//! and `deliveries retry` says when the delivery will really go. Once the endpoint
//! recovers, the probe closes the circuit and all of it clears (after the dispatcher's
//! 30 s cool-down: this test takes that long).

#[macro_use]
mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_core::{Id, IdKind};
use serde_json::Value;
use support::cli::Cli;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env};

/// The dispatcher's default: this many consecutive failures open the circuit.
const FAILURES_TO_OPEN: usize = 10;

fn time(v: &Value) -> DateTime<Utc> {
    let raw = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    DateTime::parse_from_rfc3339(raw)
        .unwrap_or_else(|e| panic!("not an RFC 3339 time ({e}): {raw:?}"))
        .with_timezone(&Utc)
}

/// Waits until `deliveries get <id>` says the delivery is deferred, and returns it.
async fn wait_deferred(cli: &Cli<'_>, id: &str) -> Value {
    cli.json_until(&["deliveries", "get", id], 60, "deferred", |d| {
        d["deferred_reason"] != ""
    })
    .await
}

async fn an_open_circuit_is_shown(backend: Backend) {
    let env = Env::with(backend).await;
    let receiver = Receiver::start().await;
    let (cli, server) = Cli::start(&env).await;
    // Retries every 100 ms: the circuit opens after ten failed attempts of one delivery.
    let schedule = vec!["100"; 30].join(",");
    let (tenant, sub) = cli
        .subscribe_with(
            &receiver,
            "down",
            Behavior::Always(500),
            &["--retry-schedule-ms", &schedule],
        )
        .await;
    let sub_id = sub["id"].as_str().expect("subscription id").to_string();
    let closed = cli.json(&["subscriptions", "get", &sub_id]).await;
    assert_eq!(
        closed["circuit_open_until"], "",
        "closed at first: {closed}"
    );

    cli.json(&[
        "publish", "--tenant", &tenant, "--type", "a.b", "--data", "{}",
    ])
    .await;
    let list = cli
        .json(&["deliveries", "list", "--subscription", &sub_id])
        .await;
    let id = list[0]["id"].as_str().expect("delivery id").to_string();

    let deferred = wait_deferred(&cli, &id).await;
    assert_eq!(deferred["deferred_reason"], "circuit_open", "{deferred}");
    assert_eq!(deferred["status"], "retrying", "{deferred}");
    let last_error = deferred["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("HTTP 500"),
        "the last error is kept: {deferred}"
    );
    let until = time(&deferred["deferred_until"]);
    assert!(until > Utc::now(), "deferred into the future: {deferred}");
    assert_eq!(deferred["deferred_until"], deferred["next_attempt_at"]);
    let attempts = deferred["attempts"].as_array().map_or(0, Vec::len);
    assert!(
        attempts >= FAILURES_TO_OPEN,
        "{attempts} attempts: {deferred}"
    );
    assert_eq!(
        receiver.received("down").len(),
        attempts,
        "no request while deferred"
    );

    let listed = cli
        .json(&["deliveries", "list", "--subscription", &sub_id])
        .await;
    assert_eq!(listed[0]["deferred_reason"], "circuit_open", "{listed}");
    let table = cli.text(&["deliveries", "get", &id]).await;
    assert!(
        table.contains("DEFERRED") && table.contains("circuit_open until"),
        "{table}"
    );

    let open = cli.json(&["subscriptions", "get", &sub_id]).await;
    let open_until = time(&open["circuit_open_until"]);
    assert!(open_until > Utc::now(), "{open}");
    let table = cli.text(&["subscriptions", "get", &sub_id]).await;
    assert!(table.contains("CIRCUIT OPEN UNTIL"), "{table}");

    let retried = cli.json(&["deliveries", "retry", &id]).await;
    assert_eq!(retried["status"], "pending", "{retried}");
    assert_eq!(retried["deferred_reason"], "circuit_open", "{retried}");
    assert_eq!(retried["deferred_until"], open["circuit_open_until"]);
    // Still only the probe-time later, as the dispatcher defers it again.
    let again = wait_deferred(&cli, &id).await;
    assert_eq!(again["deferred_reason"], "circuit_open", "{again}");
    // Put off to the probe time at least (give or take the clocks' rounding).
    let earliest = open_until - chrono::Duration::seconds(1);
    assert!(time(&again["deferred_until"]) >= earliest, "{again}");
    let text = cli.text(&["deliveries", "retry", &id]).await;
    assert!(
        text.contains("circuit breaker is open") && text.contains("at the earliest"),
        "{text}"
    );

    // The endpoint recovers: after the cool-down the probe succeeds, the circuit closes
    // and says so, and the delivery goes.
    receiver.set_behavior("down", Behavior::Ok);
    let registry = env.registry_store().await;
    let sub_key = Id::parse(IdKind::Subscription, "subscription", &sub_id).expect("id");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let d = cli.json(&["deliveries", "get", &id]).await;
        // Not only a time gone by: the dispatcher recorded the closing.
        let stored = registry.circuit_open_until(&sub_key).await.expect("read");
        if d["status"] == "succeeded" && stored.is_none() {
            assert_eq!(d["deferred_reason"], "", "{d}");
            let sub = cli.json(&["subscriptions", "get", &sub_id]).await;
            assert_eq!(sub["circuit_open_until"], "", "{sub}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered and closed within 90 s: {d}, stored {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    drop(server);
    env.finish().await;
}

on_both_backends!(an_open_circuit_is_shown);
