//! What receivers get, end to end: the real `hookline serve` delivers to real HTTP
//! receivers. A subscription's payload format picks the raw payload or the Standard
//! Webhooks envelope, the `webhook-event-type` header comes with both, and the signature
//! covers the body sent. The receiver snippets of docs/RECEIVING.md (docs/receiving/*)
//! are run as receivers of real deliveries: Python and Node as processes with the
//! `standardwebhooks` libraries deploy/ci/receiving-deps.sh installs, Rust in process.

#[macro_use]
mod support;

#[path = "../docs/receiving/receiver.rs"]
mod rust_receiver;

use std::process::Stdio;
use std::time::Duration;

use hookline_proto::v1 as pb;
use serde_json::Value;
use support::receiver::{Behavior, Receiver};
use support::tenant::TenantServer;
use support::{Backend, authed};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const WAIT: Duration = Duration::from_secs(30);
const POLL: &[(&str, &str)] = &[("HOOKLINE_RETRY_POLL_INTERVAL_MS", "50")];
/// A fixed secret, so a receiver can be started before its subscription exists.
const SECRET: &str = "whsec_c2VjcmV0LW9uZS1zZWNyZXQtb25lLXNlY3JldA==";
const PAYLOAD: &[u8] = br#"{ "invoice" : "in_1", "amount": 123456789012345678901234567890 }"#;

/// The shared start, with this file's helpers below.
type Hookline = TenantServer;

impl Hookline {
    /// A subscription to `url` signed with [`SECRET`]; returns its id.
    async fn subscribe(&mut self, url: String, format: pb::PayloadFormat) -> String {
        let sub = pb::Subscription {
            tenant_id: self.tenant.clone(),
            url,
            payload_format: format as i32,
            ..Default::default()
        };
        self.registry
            .create_subscription(authed(
                pb::CreateSubscriptionRequest {
                    subscription: Some(sub),
                    secret: SECRET.into(),
                    ..Default::default()
                },
                &self.admin,
            ))
            .await
            .expect("create the subscription")
            .into_inner()
            .subscription
            .unwrap()
            .id
    }

    async fn set_format(
        &mut self,
        id: &str,
        format: i32,
    ) -> Result<pb::Subscription, tonic::Status> {
        let req = pb::UpdateSubscriptionRequest {
            subscription: Some(pb::Subscription {
                id: id.into(),
                payload_format: format,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["payload_format".into()],
            }),
        };
        let res = self
            .registry
            .update_subscription(authed(req, &self.admin))
            .await;
        res.map(|r| r.into_inner())
    }

    /// Publishes `PAYLOAD` as `event_type`; returns the event id.
    async fn publish(&mut self, event_type: &str) -> String {
        let req = pb::PublishRequest {
            tenant_id: self.tenant.clone(),
            event_type: event_type.into(),
            payload: PAYLOAD.to_vec(),
            ..Default::default()
        };
        self.ingest
            .publish(authed(req, &self.admin))
            .await
            .expect("publish")
            .into_inner()
            .event_id
    }
}

/// Checks an envelope body: the type, a recent RFC 3339 timestamp, and the payload bytes
/// as `data`, unchanged.
fn assert_envelope(body: &[u8], event_type: &str) {
    let text = std::str::from_utf8(body).expect("a UTF-8 body");
    let parsed: Value = serde_json::from_str(text).expect("the envelope is JSON");
    assert_eq!(parsed["type"], event_type, "{text}");
    let at = parsed["timestamp"].as_str().expect("a timestamp string");
    let at = chrono::DateTime::parse_from_rfc3339(at).expect("an RFC 3339 timestamp");
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age.num_seconds().abs() < 120,
        "timestamp {at} is not recent"
    );
    let payload = std::str::from_utf8(PAYLOAD).unwrap();
    assert!(
        text.ends_with(&format!(r#""data":{payload}}}"#)),
        "data is the payload byte for byte: {text}"
    );
}

async fn raw_and_envelope_bodies_carry_the_event_type_header(backend: Backend) {
    let mut h = Hookline::start(backend, POLL).await;
    let receiver = Receiver::start().await;
    for name in ["raw", "envelope"] {
        receiver.set_secret(name, SECRET);
    }
    let raw = receiver.endpoint("raw", Behavior::Ok);
    let raw_id = h.subscribe(raw, pb::PayloadFormat::Unspecified).await;
    let envelope = receiver.endpoint("envelope", Behavior::Ok);
    h.subscribe(envelope, pb::PayloadFormat::Envelope).await;

    let event_id = h.publish("invoice.paid").await;
    for name in ["raw", "envelope"] {
        let got = receiver
            .wait_for(name, WAIT, "the delivery", |r| !r.is_empty())
            .await;
        let req = &got[0];
        assert!(req.verified, "{name}: the signature covers the body sent");
        assert_eq!(req.header("webhook-id"), event_id);
        assert_eq!(req.header("webhook-event-type"), "invoice.paid", "{name}");
        if name == "raw" {
            assert_eq!(req.body, PAYLOAD, "raw: the payload as published");
        } else {
            assert_envelope(&req.body, "invoice.paid");
        }
    }

    // The format can be changed, is shown, and an unknown one is refused by name.
    let updated = h
        .set_format(&raw_id, pb::PayloadFormat::Envelope as i32)
        .await
        .unwrap();
    assert_eq!(updated.payload_format, pb::PayloadFormat::Envelope as i32);
    let err = h.set_format(&raw_id, 7).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("subscription.payload_format")
            && err.message().contains("PAYLOAD_FORMAT_ENVELOPE"),
        "{}",
        err.message()
    );
    h.publish("invoice.voided").await;
    let got = receiver
        .wait_for("raw", WAIT, "the second delivery", |r| r.len() >= 2)
        .await;
    assert!(got[1].verified);
    assert_eq!(got[1].header("webhook-event-type"), "invoice.voided");
    assert_envelope(&got[1].body, "invoice.voided");
    h.finish().await;
}

on_both_backends!(raw_and_envelope_bodies_carry_the_event_type_header);

// ---------------------------------------------------------------------------------------
// The documented snippets.
// ---------------------------------------------------------------------------------------

/// Where deploy/ci/receiving-deps.sh put the snippets' libraries.
fn libraries() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("HOOKLINE_RECEIVING_LIBS") {
        return dir.into();
    }
    let cache = std::env::var_os("HOOKLINE_CI_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| std::path::PathBuf::from(d).join("hookline-ci"))
        })
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            std::path::PathBuf::from(home).join(".cache/hookline-ci")
        });
    cache.join("receiving")
}

/// Runs deploy/ci/receiving-deps.sh when the libraries are not there yet (a fresh
/// machine running `cargo test --workspace`), once per test binary.
fn install_libraries_once(libs: &std::path::Path) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if libs.is_dir() {
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/ci/receiving-deps.sh"
    );
    let status = std::process::Command::new("bash")
        .arg(script)
        .status()
        .expect("run deploy/ci/receiving-deps.sh");
    assert!(status.success(), "deploy/ci/receiving-deps.sh failed");
}

fn repo_file(path: &str) -> String {
    let full = concat!(env!("CARGO_MANIFEST_DIR"), "/../../");
    std::fs::read_to_string(format!("{full}{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A snippet run as a receiver process, and the JSON lines it prints.
struct Snippet {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

impl Snippet {
    async fn start([program, file, lib_var, lib_dir]: Launch) -> Snippet {
        let libs = libraries().join(lib_dir);
        install_libraries_once(&libs);
        assert!(
            libs.is_dir(),
            "{} is missing: run deploy/ci/receiving-deps.sh (it installs the \
             standardwebhooks libraries the docs/RECEIVING.md snippets use)",
            libs.display()
        );
        let port = free_port().await;
        let mut child = tokio::process::Command::new(program)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../").to_owned() + file)
            .env(lib_var, &libs)
            .env("WEBHOOK_SECRET", SECRET)
            .env("PORT", port.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("run {program} {file}: {e}"));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{file} did not listen on {port}"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{file} exited with {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Snippet {
            _child: child,
            lines,
            port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhook", self.port)
    }

    /// The next line the snippet prints, as JSON.
    async fn next_line(&mut self, what: &str) -> Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line for {what} within {WAIT:?}"))
            .expect("read the snippet's output")
            .unwrap_or_else(|| panic!("the snippet ended before {what}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

/// POSTs `body` with a signature made with another key; returns the status answered.
async fn post_forged(port: u16, body: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nwebhook-id: evt_forged\r\nwebhook-timestamp: {now}\r\n\
         webhook-signature: v1,Zm9yZ2VkLXNpZ25hdHVyZS1vZi0zMi1ieXRlcy1sb25nIQ==\r\n\
         webhook-event-type: invoice.paid\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .expect("an answer to the forged request")
        .unwrap();
    let status = answer.split_whitespace().nth(1).unwrap_or_default();
    status
        .parse()
        .unwrap_or_else(|_| panic!("no status in {answer:?}"))
}

/// One process snippet: a real delivery in `format` from Hookline on `backend` is verified
/// and printed once, a forged one is refused with 400.
async fn check_process_snippet(backend: Backend, launch: Launch, format: pb::PayloadFormat) {
    let mut snippet = Snippet::start(launch).await;
    let mut h = Hookline::start(backend, POLL).await;
    h.subscribe(snippet.url(), format).await;
    let event_id = h.publish("invoice.paid").await;
    let line = snippet.next_line("the delivery").await;
    assert_eq!(line["verified"], event_id.as_str(), "{line}");
    assert_eq!(line["type"], "invoice.paid", "{line}");
    let data = match format {
        pb::PayloadFormat::Envelope => &line["body"]["data"],
        _ => &line["body"],
    };
    assert_eq!(data["invoice"], "in_1", "{line}");

    assert_eq!(post_forged(snippet.port, PAYLOAD).await, 400);
    let line = snippet.next_line("the forged request").await;
    assert!(line["rejected"].is_string(), "{line}");
    h.finish().await;
}

/// How to run a snippet: program, file, the variable naming its library folder, and that
/// folder under [`libraries`].
type Launch = [&'static str; 4];
const PYTHON: Launch = [
    "python3",
    "docs/receiving/receiver.py",
    "PYTHONPATH",
    "python",
];
const NODE: Launch = [
    "node",
    "docs/receiving/receiver.js",
    "NODE_PATH",
    "node/node_modules",
];

#[tokio::test]
async fn the_python_snippet_verifies_a_real_delivery() {
    check_process_snippet(Backend::Embedded, PYTHON, pb::PayloadFormat::Envelope).await;
}

#[tokio::test]
async fn the_node_snippet_verifies_a_real_delivery() {
    check_process_snippet(Backend::Distributed, NODE, pb::PayloadFormat::Raw).await;
}

#[tokio::test]
async fn the_rust_snippet_verifies_a_real_delivery() {
    let mut h = Hookline::start(Backend::Embedded, POLL).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let app = rust_receiver::router(SECRET, move |event_type, event| {
        let _ = tx.send((event_type.to_owned(), event));
    })
    .expect("a valid secret");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    h.subscribe(
        format!("http://127.0.0.1:{port}/webhook"),
        pb::PayloadFormat::Envelope,
    )
    .await;
    h.publish("invoice.paid").await;
    let (event_type, event) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the delivery within the deadline")
        .unwrap();
    assert_eq!(event_type, "invoice.paid");
    assert_eq!(event["data"]["invoice"], "in_1", "{event}");
    assert_eq!(post_forged(port, PAYLOAD).await, 400);
    assert!(
        rx.try_recv().is_err(),
        "a forged request reaches no handler"
    );
    h.finish().await;
}

/// docs/RECEIVING.md shows the very files these tests run, and the Go one, which runs
/// only where Go is installed (it is not on the CI machine).
#[test]
fn the_document_shows_the_snippets_that_run() {
    let doc = repo_file("docs/RECEIVING.md");
    for file in [
        "docs/receiving/receiver.py",
        "docs/receiving/receiver.js",
        "docs/receiving/receiver.rs",
        "docs/receiving/receiver.go",
    ] {
        let code = repo_file(file);
        assert!(
            doc.contains(code.trim_end()),
            "docs/RECEIVING.md does not show {file} as it is; paste the file into its code block"
        );
    }
}
