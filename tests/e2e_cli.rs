//! The client commands of the `hookline` binary against a real server, on both backends:
//! one test per command group (tenants, subscriptions and their secrets, re-enabling
//! after a `410 Gone`, API keys, event types, events and publish), plus the output rules
//! every command shares (`--json` object or array, `--jsonl`, RFC 3339 timestamps,
//! `--server host:port`, NOT_FOUND for unknown tenants).

#[macro_use]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::cli::Cli;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env};

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn assert_rfc3339(t: &Value) {
    let t = s(t);
    assert!(
        t.len() == 20 && t.as_bytes()[10] == b'T' && t.ends_with('Z'),
        "not an RFC 3339 UTC timestamp: {t:?}"
    );
}

async fn tenant_commands(backend: Backend) {
    let env = Env::with(backend).await;
    let (cli, server) = Cli::start(&env).await;
    let created = cli.json(&["tenants", "create", "--name", "acme"]).await;
    assert!(created.is_object(), "one tenant is one object: {created}");
    assert_rfc3339(&created["created_at"]);
    let id = s(&created["id"]).to_string();

    let got = cli.json(&["tenants", "get", &id]).await;
    assert_eq!(got["name"], "acme");
    let renamed = cli
        .json(&["tenants", "update", &id, "--name", "acme-2"])
        .await;
    assert_eq!(renamed["name"], "acme-2");
    let list = cli.json(&["tenants", "list"]).await;
    assert!(
        list.as_array()
            .is_some_and(|a| a.iter().any(|t| t["id"] == id.as_str()))
    );
    let lines = cli.text(&["tenants", "list", "--jsonl"]).await;
    let first: Value = serde_json::from_str(lines.lines().next().unwrap_or_default())
        .expect("--jsonl prints one object per line");
    assert!(first.is_object());
    let table = cli.text(&["tenants", "list"]).await;
    assert!(
        table.starts_with("ID") && table.contains("acme-2"),
        "{table}"
    );

    let deleted = cli.json(&["tenants", "delete", &id]).await;
    assert_eq!(deleted["deleted"], id.as_str());
    let err = cli.fails(&["tenants", "get", &id]).await;
    assert!(err.contains("NOT_FOUND"), "{err}");
    // Every list of a tenant's things says the tenant does not exist.
    for list in [
        &["subscriptions", "list", "--tenant", &id][..],
        &["deliveries", "list", "--tenant", &id],
        &["events", "list", "--tenant", &id],
        &["keys", "list", "--tenant", &id],
        &["tail", "--tenant", &id],
    ] {
        let err = cli.fails(list).await;
        assert!(err.contains("NOT_FOUND"), "{list:?}: {err}");
    }
    drop(server);
    env.finish().await;
}

async fn subscription_commands(backend: Backend) {
    let env = Env::with(backend).await;
    let (cli, server) = Cli::start(&env).await;
    let tenant = cli.tenant().await;
    let created = cli
        .json(&[
            "subscriptions",
            "create",
            "--tenant",
            &tenant,
            "--url",
            "http://127.0.0.1:9/a",
            "--event-type",
            "invoice.*",
        ])
        .await;
    let id = s(&created["id"]).to_string();
    let first_secret = s(&created["secret"]).to_string();
    assert!(first_secret.starts_with("whsec_"));
    assert_eq!(created["payload_format"], "raw", "raw is the default");

    let updated = cli
        .json(&[
            "subscriptions",
            "update",
            &id,
            "--url",
            "http://127.0.0.1:9/b",
            "--description",
            "billing",
            "--header",
            "x-team=billing",
        ])
        .await;
    assert_eq!(updated["url"], "http://127.0.0.1:9/b");
    assert_eq!(updated["description"], "billing");
    assert_eq!(updated["headers"]["x-team"], "billing");
    assert_eq!(
        updated["event_types"][0], "invoice.*",
        "unnamed fields stay"
    );
    let all = cli
        .json(&["subscriptions", "update", &id, "--all-event-types"])
        .await;
    assert_eq!(all["event_types"].as_array().map(Vec::len), Some(0));
    let enveloped = cli
        .json(&[
            "subscriptions",
            "update",
            &id,
            "--payload-format",
            "envelope",
        ])
        .await;
    assert_eq!(enveloped["payload_format"], "envelope");
    let err = cli
        .fails(&["subscriptions", "update", &id, "--payload-format", "xml"])
        .await;
    assert!(err.contains("raw") && err.contains("envelope"), "{err}");

    let disabled = cli.json(&["subscriptions", "disable", &id]).await;
    assert_eq!(disabled["state"], "disabled");
    let enabled = cli.json(&["subscriptions", "enable", &id]).await;
    assert_eq!(enabled["state"], "enabled");
    let listed = cli
        .json(&["subscriptions", "list", "--tenant", &tenant])
        .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    let secret = cli.json(&["subscriptions", "secret", &id]).await;
    assert_eq!(secret["secret"], first_secret.as_str());
    let rotated = cli
        .json(&["subscriptions", "rotate-secret", &id, "--grace-secs", "60"])
        .await;
    assert_ne!(rotated["secret"], first_secret.as_str());
    assert_rfc3339(&rotated["previous_expires_at"]);
    let secret = cli.json(&["subscriptions", "secret", &id]).await;
    assert_eq!(secret["secret"], rotated["secret"]);
    assert_eq!(secret["live_secrets"].as_array().map(Vec::len), Some(2));

    let err = cli.fails(&["subscriptions", "update", &id]).await;
    assert!(err.contains("nothing to change"), "{err}");
    cli.json(&["subscriptions", "delete", &id]).await;
    let err = cli.fails(&["subscriptions", "get", &id]).await;
    assert!(err.contains("NOT_FOUND"), "{err}");
    drop(server);
    env.finish().await;
}

/// Waits until `subscriptions get` shows `state`, or panics after 30 s.
async fn wait_state(cli: &Cli<'_>, id: &str, state: &str) -> Value {
    cli.json_until(&["subscriptions", "get", id], 30, state, |sub| {
        sub["state"] == state
    })
    .await
}

async fn enable_after_gone(backend: Backend) {
    let env = Env::with(backend).await;
    let receiver = Receiver::start().await;
    let (cli, server) = Cli::start(&env).await;
    let (tenant, sub) = cli
        .subscribe(&receiver, "gone", Behavior::Always(410))
        .await;
    let id = s(&sub["id"]).to_string();
    let publish = [
        "publish", "--tenant", &tenant, "--type", "a.b", "--data", "{}",
    ];
    cli.json(&publish).await;
    let disabled = wait_state(&cli, &id, "disabled").await;
    assert!(
        s(&disabled["disabled_reason"]).contains("410"),
        "{disabled}"
    );
    let table = cli.text(&["subscriptions", "get", &id]).await;
    assert!(
        table.contains("DISABLED BECAUSE") && table.contains("410"),
        "{table}"
    );

    receiver.set_behavior("gone", Behavior::Ok);
    let enabled = cli.json(&["subscriptions", "enable", &id]).await;
    assert_eq!(enabled["state"], "enabled");
    assert_eq!(enabled["disabled_reason"], "");
    // The announcement of the change reaches ingest; publish until it matches again.
    cli.publish_until_matched(&tenant, 30).await;
    receiver
        .wait_for(
            "gone",
            Duration::from_secs(30),
            "a delivery after enable",
            |r| r.iter().any(|r| r.verified) && r.len() >= 2,
        )
        .await;
    drop(server);
    env.finish().await;
}

async fn key_commands(backend: Backend) {
    let env = Env::with(backend).await;
    let (cli, server) = Cli::start(&env).await;
    let tenant = cli.tenant().await;
    let key = cli
        .json(&["keys", "create", "--name", "ci", "--tenant", &tenant])
        .await;
    let key_id = s(&key["id"]).to_string();
    let token = s(&key["token"]).to_string();
    let tenant_cli = Cli {
        env: &env,
        server: cli.server.clone(),
        token: token.clone(),
    };
    let own = tenant_cli.json(&["tenants", "get", &tenant]).await;
    assert_eq!(own["id"], tenant.as_str());
    let listed = cli.json(&["keys", "list", "--tenant", &tenant]).await;
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|k| k["id"] == key_id.as_str()))
    );
    let admins = cli.json(&["keys", "list"]).await;
    assert!(admins.as_array().is_some_and(|a| !a.is_empty()), "{admins}");

    let revoked = cli.json(&["keys", "revoke", &key_id]).await;
    assert_rfc3339(&revoked["revoked_at"]);
    let err = tenant_cli.fails(&["tenants", "get", &tenant]).await;
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    drop(server);
    env.finish().await;
}

async fn event_type_commands(backend: Backend) {
    let env = Env::with(backend).await;
    let (cli, server) = Cli::start(&env).await;
    let created = cli
        .json(&[
            "event-types",
            "create",
            "invoice.paid",
            "--description",
            "paid",
        ])
        .await;
    assert_eq!(created["name"], "invoice.paid");
    let got = cli.json(&["event-types", "get", "invoice.paid"]).await;
    assert_eq!(got["description"], "paid");
    let archived = cli
        .json(&[
            "event-types",
            "update",
            "invoice.paid",
            "--archived",
            "true",
        ])
        .await;
    assert_eq!(archived["archived"], true);
    let live = cli.json(&["event-types", "list"]).await;
    assert_eq!(live.as_array().map(Vec::len), Some(0), "{live}");
    let all = cli.json(&["event-types", "list", "--archived"]).await;
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    cli.json(&["event-types", "delete", "invoice.paid"]).await;
    let err = cli.fails(&["event-types", "get", "invoice.paid"]).await;
    assert!(err.contains("NOT_FOUND"), "{err}");
    drop(server);
    env.finish().await;
}

async fn publish_and_event_commands(backend: Backend) {
    let env = Env::with(backend).await;
    let receiver = Receiver::start().await;
    let (cli, server) = Cli::start(&env).await;
    let (tenant, _) = cli.subscribe(&receiver, "ok", Behavior::Ok).await;
    let data = r#"{"amount":42}"#;
    let published = cli
        .json(&[
            "publish",
            "--tenant",
            &tenant,
            "--type",
            "invoice.paid",
            "--data",
            data,
        ])
        .await;
    assert_eq!(published["deliveries_created"], 1);
    let event_id = s(&published["event_id"]).to_string();

    let event = cli.json(&["events", "get", &event_id]).await;
    assert_eq!(event["payload"]["amount"], 42, "{event}");
    assert!(
        s(&event["idempotency_key"]).starts_with("hlc_"),
        "a key by default"
    );
    assert_rfc3339(&event["created_at"]);
    let shown = cli.text(&["events", "get", &event_id]).await;
    assert!(shown.contains("\"amount\": 42"), "{shown}");
    let events = cli
        .json(&[
            "events",
            "list",
            "--tenant",
            &tenant,
            "--type",
            "invoice.paid",
        ])
        .await;
    assert_eq!(events[0]["id"], event_id.as_str());

    receiver
        .wait_for("ok", Duration::from_secs(30), "the delivery", |r| {
            !r.is_empty()
        })
        .await;
    let lines = cli
        .text(&["deliveries", "list", "--tenant", &tenant, "--jsonl"])
        .await;
    let d: Value = serde_json::from_str(lines.lines().next().unwrap_or_default()).expect("jsonl");
    assert_eq!(d["event_id"], event_id.as_str());
    let err = cli.fails(&["deliveries", "list", "--status", "lost"]).await;
    assert!(err.contains("pending") && err.contains("failed"), "{err}");
    drop(server);
    env.finish().await;
}

on_both_backends!(
    tenant_commands,
    subscription_commands,
    enable_after_gone,
    key_commands,
    event_type_commands,
    publish_and_event_commands,
);

/// `admin create-key --json` prints one object; client commands refuse server flags and
/// explain a server address they cannot use.
#[tokio::test]
async fn admin_json_and_flag_placement() {
    let env = Env::with(Backend::Embedded).await;
    env.run_ok(&["migrate"]).await;
    let out = env
        .run_ok(&["admin", "create-key", "--name", "ci", "--json"])
        .await;
    let key: Value = serde_json::from_str(&out).expect("one JSON object");
    assert!(s(&key["token"]).starts_with("hl_"), "{key}");
    assert!(s(&key["id"]).starts_with("key_"), "{key}");

    let out = env
        .command()
        .args(["tenants", "list", "--data-dir", "/tmp/x"])
        .output()
        .await
        .expect("run hookline");
    assert!(!out.status.success());
    let out = env
        .command()
        .args([
            "tenants",
            "list",
            "--server",
            "ftp://127.0.0.1:1",
            "--token",
            "x",
        ])
        .output()
        .await
        .expect("run hookline");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("host:port"), "{err}");
    env.finish().await;
}
