//! The embedded default: `hookline serve` with no database or broker configured runs
//! everything in one process on SQLite and the in-process queue. Its first start hands
//! out an admin key, bad configuration fails clearly, and a SIGKILL in the middle of
//! thousands of deliveries loses nothing that was acknowledged.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, authed};

async fn run_failing(env: &Env, args: &[&str], extra: &[(&str, &str)]) -> String {
    let out = env
        .command()
        .args(args)
        .envs(extra.iter().copied())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test]
async fn bad_configuration_fails_with_a_clear_message_and_no_panic() {
    let env = Env::with(Backend::Embedded).await;
    let err = run_failing(&env, &["serve", "--services", "dispatcher"], &[]).await;
    assert!(
        err.contains("--services dispatcher needs the distributed backends"),
        "{err}"
    );
    assert!(
        err.contains("HOOKLINE_DATABASE_URL") && err.contains("HOOKLINE_AMQP_URL"),
        "{err}"
    );

    let err = run_failing(
        &env,
        &["serve"],
        &[(
            "HOOKLINE_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/x?sslmode=disable",
        )],
    )
    .await;
    assert!(err.contains("HOOKLINE_AMQP_URL is not"), "{err}");
    let err = run_failing(
        &env,
        &["serve"],
        &[("HOOKLINE_AMQP_URL", "amqp://127.0.0.1:5672")],
    )
    .await;
    assert!(err.contains("HOOKLINE_DATABASE_URL is not"), "{err}");

    // A data directory that cannot be created (a file is in the way).
    std::fs::write(&env.data_dir, b"not a directory").unwrap();
    let err = run_failing(&env, &["serve"], &[]).await;
    assert!(err.contains("data directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_file(&env.data_dir).unwrap();
    env.finish().await;
}

/// Reads the first-start banner of a fresh embedded server: the admin token.
async fn first_start_token(env: &Env, settings: &[(&str, &str)]) -> (support::Server, String) {
    let mut cmd = env.command();
    cmd.envs(settings.iter().copied());
    cmd.args([
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let (mut grpc, mut token, mut banner) = (None, None, String::new());
    tokio::time::timeout(Duration::from_secs(60), async {
        while !banner.contains("hookline tail") {
            let line = lines.next_line().await.unwrap().expect("hookline exited");
            banner.push_str(&line);
            banner.push('\n');
            if let Some(a) = line.strip_prefix("hookline: grpc listening on ") {
                grpc = Some(a.to_string());
            }
            if line.trim().starts_with("hl_") {
                token = Some(line.trim().to_string());
            }
        }
    })
    .await
    .expect("first-start banner within 60 s");
    assert!(banner.contains("hookline publish"), "{banner}");
    assert!(banner.contains("subscriptions create"), "{banner}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let server = support::Server {
        child,
        grpc: format!("http://{}", grpc.unwrap_or_default()),
        admin: String::new(),
        rest: None,
        console: None,
    };
    (server, token.unwrap_or_default())
}

#[tokio::test]
async fn the_first_start_prints_a_working_admin_key_and_later_starts_do_not() {
    let env = Env::with(Backend::Embedded).await;
    let (server, token) = first_start_token(&env, &[]).await;
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("the printed key is an admin key");
    assert!(server.terminate().await.success());

    // Second start on the same data directory: no new key.
    let mut child = env
        .command()
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("hookline exited");
            let done = line.starts_with("hookline: embedded backends in");
            seen.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .unwrap();
    let _ = child.start_kill();
    // Give the child a moment to print anything more it would print at start.
    let rest = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await;
    if let Ok(Ok(Some(line))) = rest {
        seen.push(line);
    }
    assert!(
        !seen.iter().any(|l| l.trim().starts_with("hl_")),
        "{seen:?}"
    );
    let _ = child.wait().await;
    env.finish().await;
}

#[tokio::test]
async fn sigkill_mid_delivery_loses_no_acknowledged_event_and_retries_still_fire() {
    let env = Env::with(Backend::Embedded).await;
    // A slow receiver and few requests at a time, so that the kill lands while most
    // deliveries are still queued.
    let slow = [("HOOKLINE_DISPATCHER_CONCURRENCY", "8")];
    let (server, token) = first_start_token(&env, &slow).await;
    let receiver = Receiver::start().await;
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let tenant = registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    let subscribe = |name: &str, behavior: Behavior, filter: &str, schedule_ms: u64| {
        let url = receiver.endpoint(name, behavior);
        let req = authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.clone(),
                    url,
                    event_types: vec![filter.into()],
                    retry_policy: Some(pb::RetryPolicy {
                        schedule: vec![prost_types::Duration {
                            seconds: (schedule_ms / 1000) as i64,
                            nanos: ((schedule_ms % 1000) * 1_000_000) as i32,
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &token,
        );
        let mut registry = registry.clone();
        let receiver = receiver.clone();
        let name = name.to_string();
        async move {
            let created = registry
                .create_subscription(req)
                .await
                .unwrap()
                .into_inner();
            receiver.set_secret(&name, &created.secret);
        }
    };
    subscribe("bulk", Behavior::Slow(20), "bulk.*", 100).await;
    // Fails once; its retry is due well after the restart.
    subscribe("later", Behavior::FailTimes(1, 503), "later.*", 8000).await;

    let mut ingest = IngestServiceClient::new(
        tonic::transport::Channel::from_shared(server.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let retry_event = ingest
        .publish(authed(
            pb::PublishRequest {
                tenant_id: tenant.clone(),
                event_type: "later.due".into(),
                payload: b"{}".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .event_id;
    receiver
        .wait_for(
            "later",
            Duration::from_secs(30),
            "the first failing attempt",
            |r| !r.is_empty(),
        )
        .await;

    // Publish in batches until the process is killed; every batch answered OK counts.
    let mut acknowledged: HashSet<String> = HashSet::new();
    let mut pid = server.child.id();
    for batch in 0..30 {
        let events = (0..100)
            .map(|i| pb::PublishRequest {
                tenant_id: tenant.clone(),
                event_type: "bulk.created".into(),
                payload: format!(r#"{{"batch":{batch},"i":{i}}}"#).into_bytes(),
                ..Default::default()
            })
            .collect();
        let res = ingest
            .publish_batch(authed(pb::PublishBatchRequest { events }, &token))
            .await
            .unwrap()
            .into_inner();
        acknowledged.extend(res.results.into_iter().map(|r| r.event_id));
        if batch == 20 {
            // Mid-stream: some deliveries made, many still queued.
            if let Some(p) = pid.take() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .status()
                    .await;
            }
            break;
        }
    }
    let mut child = server.child;
    let _ = child.wait().await;
    let before_restart: usize = receiver.received("bulk").len();
    assert!(
        before_restart < acknowledged.len(),
        "the kill came mid-delivery ({before_restart} of {} delivered)",
        acknowledged.len()
    );

    let restarted = env.serve_with("all", &slow).await;
    let got = receiver
        .wait_for(
            "bulk",
            Duration::from_secs(120),
            "every acknowledged event",
            |r| {
                let ids: HashSet<String> = r.iter().map(|r| r.header("webhook-id")).collect();
                acknowledged.iter().all(|id| ids.contains(id))
            },
        )
        .await;
    let distinct: HashSet<String> = got.iter().map(|r| r.header("webhook-id")).collect();
    let duplicates = got.len() - distinct.len();
    eprintln!(
        "acknowledged {} events; {} delivered before the kill; {} duplicates after restart",
        acknowledged.len(),
        before_restart,
        duplicates
    );
    assert!(got.iter().all(|r| r.verified));

    let later = receiver
        .wait_for(
            "later",
            Duration::from_secs(30),
            "the scheduled retry",
            |r| r.len() >= 2,
        )
        .await;
    assert!(later.iter().all(|r| r.header("webhook-id") == retry_event));
    assert!(restarted.terminate().await.success());
    env.finish().await;
}
