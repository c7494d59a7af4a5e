//! Starting and stopping, end to end with the real binary: SIGTERM ends every open
//! `WatchDeliveries` stream (a real `hookline tail` reports it and reconnects, or stops
//! cleanly), in-flight deliveries get a bounded drain, a second signal exits at once,
//! and nothing acknowledged is lost across it all. A taken port fails the start before
//! anything is created; the first admin key is never lost; `admin create-key` never
//! creates a data directory.

#[macro_use]
mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookline_proto::v1 as pb;
use hookline_proto::v1::ingest_service_client::IngestServiceClient;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::receiver::{Behavior, Receiver};
use support::{BIN, Backend, Env, Server, authed};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

on_both_backends!(
    sigterm_ends_every_tail_stream_and_tail_reconnects_or_stops_cleanly,
    the_drain_is_bounded_and_a_second_signal_exits_at_once,
    a_taken_port_fails_the_start_before_anything_is_created,
);

/// The lines a child process writes on one of its outputs, as they come.
#[derive(Clone, Default)]
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    notify: Arc<Notify>,
}

impl Output {
    fn follow(reader: impl AsyncRead + Unpin + Send + 'static) -> Output {
        let out = Output::default();
        let sink = out.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lines.lock().unwrap().push(line);
                sink.notify.notify_waiters();
            }
        });
        out
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line containing `needle`, waiting for it at most `within`.
    async fn wait_for(&self, needle: &str, within: Duration) -> String {
        self.wait_for_nth(needle, 1, within).await
    }

    /// The `n`-th line containing `needle`, waiting for it at most `within`.
    async fn wait_for_nth(&self, needle: &str, n: usize, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "no {n} lines with {needle:?} within {within:?}; got:\n{}",
                    self.text()
                );
            }
        }
    }
}

/// A `hookline tail --tenant` attached to `server`, with both outputs followed.
struct Tail {
    child: Child,
    stdout: Output,
    stderr: Output,
}

fn tail(server: &str, token: &str, tenant: &str, reconnect_secs: u64) -> Tail {
    let mut child = Command::new(BIN)
        .args(["tail", "--tenant", tenant, "--reconnect-secs"])
        .arg(reconnect_secs.to_string())
        .env("HOOKLINE_SERVER", server)
        .env("HOOKLINE_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hookline tail");
    let stdout = Output::follow(child.stdout.take().expect("stdout"));
    let stderr = Output::follow(child.stderr.take().expect("stderr"));
    Tail {
        child,
        stdout,
        stderr,
    }
}

/// A local address no one listens on (bound, then released).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").to_string()
}

/// Sends `signal` (`-TERM`, `-INT`) to the child.
async fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the child is running");
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Waits at most `within` for the child to exit; returns its status and how long it took.
async fn exit_within(child: &mut Child, within: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the process did not exit within {within:?}"))
        .expect("wait for the process");
    (status, started.elapsed())
}

/// Polls `probe` until it gives a value, for at most `within`.
async fn wait_until<T>(within: Duration, what: &str, probe: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until nothing accepts connections on `addr` any more.
async fn wait_refused(addr: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tenant with one subscription to receiver endpoint `name` for `lifecycle.*`.
async fn tenant_with_endpoint(
    grpc: &str,
    token: &str,
    receiver: &Receiver,
    name: &str,
    behavior: Behavior,
) -> String {
    let mut registry = RegistryServiceClient::connect(grpc.to_string())
        .await
        .expect("connect to the registry");
    let tenant = registry
        .create_tenant(authed(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("create tenant")
        .into_inner()
        .id;
    let created = registry
        .create_subscription(authed(
            pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    tenant_id: tenant.clone(),
                    url: receiver.endpoint(name, behavior),
                    event_types: vec!["lifecycle.*".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("create subscription")
        .into_inner();
    receiver.set_secret(name, &created.secret);
    tenant
}

async fn publish(grpc: &str, token: &str, tenant: &str, event_type: &str) -> String {
    let mut ingest = IngestServiceClient::connect(grpc.to_string())
        .await
        .expect("connect to ingest");
    ingest
        .publish(authed(
            pb::PublishRequest {
                tenant_id: tenant.to_string(),
                event_type: event_type.into(),
                payload: b"{}".to_vec(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("publish")
        .into_inner()
        .event_id
}

async fn sigterm_ends_every_tail_stream_and_tail_reconnects_or_stops_cleanly(backend: Backend) {
    let env = Env::with(backend).await;
    let token = env.admin_key().await;
    let addr = free_addr();
    let server = env.serve_on("all", &addr, &[]).await;
    let receiver = Receiver::start().await;
    let tenant = tenant_with_endpoint(&server.grpc, &token, &receiver, "ok", Behavior::Ok).await;

    // Two tails: one that keeps reconnecting, one that stops at once.
    let mut staying = tail(&server.grpc, &token, &tenant, 60);
    let mut leaving = tail(&server.grpc, &token, &tenant, 0);
    for t in [&staying, &leaving] {
        t.stderr
            .wait_for("following deliveries", Duration::from_secs(30))
            .await;
    }
    publish(&server.grpc, &token, &tenant, "lifecycle.before").await;
    for t in [&staying, &leaving] {
        t.stdout
            .wait_for("lifecycle.before", Duration::from_secs(30))
            .await;
    }

    let mut child = server.child;
    signal(&child, "-TERM").await;
    let (status, took) = exit_within(&mut child, Duration::from_secs(20)).await;
    eprintln!("{backend:?}: the server exited {took:?} after SIGTERM with two tails attached");
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(10),
        "a stop with nothing in flight took {took:?}"
    );
    for t in [&staying, &leaving] {
        t.stderr
            .wait_for("server shutting down", Duration::from_secs(5))
            .await;
    }
    let (status, _) = exit_within(&mut leaving.child, Duration::from_secs(5)).await;
    assert!(status.success(), "{status}: {}", leaving.stderr.text());
    leaving
        .stderr
        .wait_for("stopped following", Duration::from_secs(1))
        .await;

    // The server comes back where it was: the staying tail follows it again.
    let server = env.serve_on("all", &addr, &[]).await;
    staying
        .stderr
        .wait_for("reconnected", Duration::from_secs(30))
        .await;
    publish(&server.grpc, &token, &tenant, "lifecycle.after").await;
    staying
        .stdout
        .wait_for("lifecycle.after", Duration::from_secs(30))
        .await;
    assert!(
        staying.child.try_wait().expect("tail status").is_none(),
        "the reconnected tail keeps following"
    );
    assert!(server.terminate().await.success());
    staying
        .stderr
        .wait_for_nth("server shutting down", 2, Duration::from_secs(5))
        .await;
    env.finish().await;
}

async fn the_drain_is_bounded_and_a_second_signal_exits_at_once(backend: Backend) {
    let env = Env::with(backend).await;
    let token = env.admin_key().await;
    let receiver = Receiver::start().await;
    // Requests that never get an answer (until the third), and a request timeout far
    // beyond the test: only the drain bound or a second signal can end the process.
    let patient = [
        ("HOOKLINE_SHUTDOWN_DRAIN_SECS", "600"),
        ("HOOKLINE_REQUEST_TIMEOUT_MS", "3600000"),
    ];
    let server = env.serve_with("all", &patient).await;
    let tenant = tenant_with_endpoint(
        &server.grpc,
        &token,
        &receiver,
        "hang",
        Behavior::HangTimes(2),
    )
    .await;
    let event = publish(&server.grpc, &token, &tenant, "lifecycle.hang").await;
    let in_flight = |n: usize| {
        let receiver = receiver.clone();
        async move {
            receiver
                .wait_for("hang", Duration::from_secs(60), "a hanging request", |r| {
                    r.len() >= n
                })
                .await;
        }
    };
    in_flight(1).await;

    // First signal: the drain holds the process for the hanging delivery.
    let mut child = server.child;
    signal(&child, "-TERM").await;
    wait_refused(&server.admin, Duration::from_secs(10)).await;
    assert!(
        child.try_wait().expect("server status").is_none(),
        "the drain waits for the in-flight delivery"
    );
    // Second signal: out at once.
    signal(&child, "-TERM").await;
    let (status, took) = exit_within(&mut child, Duration::from_secs(5)).await;
    eprintln!("{backend:?}: the second SIGTERM ended the process in {took:?} ({status})");
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");

    // The delivery was never acknowledged: it comes again, and hangs again. One
    // signal now, with a 2 s drain: the process ends by itself within the bound.
    let server = env
        .serve_with("all", &[("HOOKLINE_SHUTDOWN_DRAIN_SECS", "2"), patient[1]])
        .await;
    in_flight(2).await;
    let mut child = server.child;
    signal(&child, "-INT").await;
    let (status, took) = exit_within(&mut child, Duration::from_secs(15)).await;
    eprintln!("{backend:?}: with a 2 s drain, SIGINT ended the process in {took:?}");
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(1500),
        "the drain was given: {took:?}"
    );

    // And a third time, answered: the event was never lost.
    let server = env.serve("all").await;
    let got = receiver
        .wait_for(
            "hang",
            Duration::from_secs(60),
            "the answered request",
            |r| r.len() >= 3,
        )
        .await;
    assert!(
        got.iter()
            .all(|r| r.header("webhook-id") == event && r.verified)
    );
    assert!(server.terminate().await.success());
    env.finish().await;
}

async fn a_taken_port_fails_the_start_before_anything_is_created(backend: Backend) {
    let env = Env::with(backend).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("address").to_string();
    for (flag, what) in [("--grpc-addr", "gRPC"), ("--admin-addr", "admin HTTP")] {
        let other = if flag == "--grpc-addr" {
            "--admin-addr"
        } else {
            "--grpc-addr"
        };
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            env.command()
                .env("HOOKLINE_LOG", "info")
                .args(["serve", flag, &taken_addr, other, "127.0.0.1:0"])
                .output(),
        )
        .await
        .expect("the start fails within 30 s")
        .expect("run hookline serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let expected = format!("cannot listen for {what} on {taken_addr}");
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(stderr.contains("already in use"), "{stderr}");
        assert!(stderr.contains(flag), "{stderr}");
        assert!(!stderr.contains("consuming"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    }
    match &env.db {
        // The database was not even migrated.
        Some(db) => {
            let pool = sqlx::PgPool::connect(db.url()).await.expect("connect");
            let migrated: bool =
                sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                    .fetch_one(&pool)
                    .await
                    .expect("query");
            pool.close().await;
            assert!(!migrated, "the start migrated the database before failing");
        }
        None => assert!(
            !env.data_dir.exists(),
            "the start created {} before failing",
            env.data_dir.display()
        ),
    }
    drop(taken);
    env.finish().await;
}

#[tokio::test]
async fn admin_create_key_never_creates_a_data_directory() {
    let env = Env::with(Backend::Embedded).await;
    let elsewhere = env.data_dir.with_extension("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("make a working directory");
    let out = env
        .command()
        .env_remove("HOOKLINE_DATA_DIR")
        .current_dir(&elsewhere)
        .args(["admin", "create-key", "--name", "me"])
        .output()
        .await
        .expect("run create-key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let looked = elsewhere.join("hookline-data");
    assert!(
        stderr.contains(&looked.display().to_string()),
        "names where it looked: {stderr}"
    );
    assert!(
        stderr.contains("--data-dir") && stderr.contains("HOOKLINE_DATA_DIR"),
        "{stderr}"
    );
    assert!(!looked.exists(), "created {}", looked.display());
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Pointed at the server's data directory, it works from anywhere.
    let server = env.serve("all").await;
    let out = env
        .command()
        .env_remove("HOOKLINE_DATA_DIR")
        .current_dir(&elsewhere)
        .args(["admin", "create-key", "--name", "me", "--data-dir"])
        .arg(&env.data_dir)
        .output()
        .await
        .expect("run create-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hl_"));
    assert!(server.terminate().await.success());
    let _ = std::fs::remove_dir_all(&elsewhere);
    env.finish().await;
}

/// The first start of a fresh embedded installation, with stdout read line by line.
fn first_start(env: &Env, grpc_addr: &str) -> (Child, Output) {
    let mut child = env
        .command()
        .args([
            "serve",
            "--grpc-addr",
            grpc_addr,
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn hookline serve");
    let stdout = Output::follow(child.stdout.take().expect("stdout"));
    (child, stdout)
}

#[tokio::test]
async fn a_first_admin_key_never_shown_is_replaced_on_the_next_start() {
    let env = Env::with(Backend::Embedded).await;
    let addr = free_addr();
    // stdout closed at once: the banner cannot be written.
    let mut blind = env
        .command()
        .args(["serve", "--grpc-addr", &addr, "--admin-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn hookline serve");
    drop(blind.stdout.take());
    // It marks the key pending, creates it, fails to show it, and revokes it.
    let marker = env.data_dir.join("first-admin-key");
    let unshown = wait_until(
        Duration::from_secs(60),
        "the first key marked pending",
        || {
            let text = std::fs::read_to_string(&marker).unwrap_or_default();
            text.trim().strip_prefix("pending ").map(str::to_string)
        },
    )
    .await;
    let store = hookline_store::SqliteStore::open(&env.data_dir.join("hookline.db"))
        .await
        .expect("open the embedded database");
    let id =
        hookline_core::Id::parse(hookline_core::IdKind::ApiKey, "key", &unshown).expect("a key id");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let key = hookline_store::port::RegistryStore::get_api_key(&store, &id).await;
        if key.is_ok_and(|k| k.revoked_at.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the unshown key {unshown} was not revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await;
    let server = Server {
        child: blind,
        grpc: format!("http://{addr}"),
        admin: String::new(),
        rest: None,
        console: None,
    };
    assert!(server.terminate().await.success());

    // The next start shows a key, and the one nobody saw no longer works.
    let (child, stdout) = first_start(&env, &addr);
    let line = stdout
        .wait_for("hl_", Duration::from_secs(60))
        .await
        .trim()
        .to_string();
    stdout
        .wait_for("hookline tail", Duration::from_secs(5))
        .await;
    let mut registry = RegistryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let keys = registry
        .list_api_keys(authed(pb::ListApiKeysRequest::default(), &line))
        .await
        .expect("the shown key is an admin key")
        .into_inner()
        .api_keys;
    let old = keys
        .iter()
        .find(|k| k.id == unshown)
        .expect("the unshown key");
    assert!(old.revoked_at.is_some(), "the unshown key is revoked");
    assert_eq!(keys.iter().filter(|k| k.revoked_at.is_none()).count(), 1);
    let server = Server {
        child,
        grpc: format!("http://{addr}"),
        admin: String::new(),
        rest: None,
        console: None,
    };
    assert!(server.terminate().await.success());
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default().trim(),
        "shown"
    );
    env.finish().await;
}
