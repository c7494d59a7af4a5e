//! Asymmetric signatures and mutual TLS towards receivers, end to end with the real
//! `hookline serve` and its CLI, on both backends:
//! - an ed25519 (`v1a`) subscription shows only `whpk_` public keys, and its signatures
//!   are verified by Python `cryptography` following the specification's signing string
//!   (an implementation that is not ours: docs/receiving/verify_v1a.py, shown in
//!   docs/RECEIVING.md), before and during a rotation (two keys sign);
//! - an HTTPS receiver that requires a client certificate from its CA (certificates made
//!   here with rcgen) gets deliveries from a subscription carrying one, and refuses one
//!   without: that delivery fails with attempts of class `tls` naming the certificate.

#[macro_use]
mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};
use support::cli::Cli;
use support::receiver::{Behavior, Received, Receiver};
use support::{Backend, Env, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);
const POLL: (&str, &str) = ("HOOKLINE_RETRY_POLL_INTERVAL_MS", "50");

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// A CLI on a server started with `settings`.
async fn serve<'a>(env: &'a Env, settings: &[(&str, &str)]) -> (Cli<'a>, Server) {
    let token = env.admin_key().await;
    let server = env.serve_with("all", settings).await;
    let addr = server.grpc.trim_start_matches("http://").to_string();
    let cli = Cli {
        env,
        server: addr,
        token,
    };
    (cli, server)
}

async fn publish(cli: &Cli<'_>, tenant: &str, n: u32) {
    let data = format!(r#"{{"n":{n}}}"#);
    let args = ["publish", "--tenant", tenant, "--type", "invoice.paid"];
    let mut all = args.to_vec();
    all.extend(["--data", &data]);
    cli.json(&all).await;
}

// ---------------------------------------------------------------------------------------
// v1a, verified by Python `cryptography`.
// ---------------------------------------------------------------------------------------

/// `PYTHONPATH` for a python3 that imports `cryptography`: none when the system's does,
/// else what deploy/ci/signing-deps.sh installs (run here when needed).
fn python_path() -> Option<PathBuf> {
    static PATH: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let imports = |path: Option<&Path>| {
            let mut cmd = std::process::Command::new("python3");
            cmd.args(["-c", "import cryptography"])
                .stderr(Stdio::null());
            if let Some(p) = path {
                cmd.env("PYTHONPATH", p);
            }
            cmd.status().is_ok_and(|s| s.success())
        };
        if imports(None) {
            return None;
        }
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/ci/signing-deps.sh"
        );
        let status = std::process::Command::new("bash").arg(script).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "deploy/ci/signing-deps.sh failed"
        );
        let cache = std::env::var_os("HOOKLINE_CI_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hookline-ci"))
            })
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/hookline-ci")
            });
        let dir = cache.join("signing/python");
        assert!(
            imports(Some(&dir)),
            "cryptography does not import from {}",
            dir.display()
        );
        Some(dir)
    })
    .clone()
}

/// Which of `public_keys` Python finds a valid `v1a` entry for in `req` (with `body`
/// instead of the body received, when given), and how many `v1a` entries it saw.
fn python_verify(req: &Received, body: Option<&[u8]>, public_keys: &[&str]) -> Value {
    let headers: serde_json::Map<String, Value> =
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .into_iter()
            .map(|h| (h.to_owned(), Value::String(req.header(h))))
            .collect();
    let input = json!({
        "headers": headers,
        "body_b64": STANDARD.encode(body.unwrap_or(&req.body)),
        "public_keys": public_keys,
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/receiving/verify_v1a.py"
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = python_path() {
        cmd.env("PYTHONPATH", path);
    }
    let mut child = cmd.spawn().expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docs/receiving/verify_v1a.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verify_v1a.py prints JSON")
}

#[test]
fn the_document_shows_the_v1a_verifier_that_runs() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../");
    let doc = std::fs::read_to_string(format!("{root}docs/RECEIVING.md")).unwrap();
    let code = std::fs::read_to_string(format!("{root}docs/receiving/verify_v1a.py")).unwrap();
    assert!(
        doc.contains(code.trim_end()),
        "docs/RECEIVING.md does not show docs/receiving/verify_v1a.py as it is"
    );
}

async fn v1a_signatures_verify_in_python_across_a_rotation(backend: Backend) {
    let env = Env::with(backend).await;
    let (cli, server) = serve(&env, &[POLL]).await;
    let receiver = Receiver::start().await;
    let flags = ["--signature-scheme", "ed25519"];
    let (tenant, sub) = cli
        .subscribe_with(&receiver, "ed", Behavior::Ok, &flags)
        .await;
    let id = s(&sub["id"]).to_string();
    let first = s(&sub["secret"]).to_string();
    assert!(
        first.starts_with("whpk_"),
        "create shows the public key: {sub}"
    );
    assert_eq!(sub["signature_scheme"], "ed25519");
    let shown = cli.json(&["subscriptions", "secret", &id]).await;
    assert_eq!(shown["secret"], first.as_str());
    let got = cli.json(&["subscriptions", "get", &id]).await;
    assert_eq!(got["signature_scheme"], "ed25519");

    publish(&cli, &tenant, 1).await;
    let got = receiver
        .wait_for("ed", WAIT, "the first delivery", |r| !r.is_empty())
        .await;
    let other = "whpk_A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
    let check = python_verify(&got[0], None, &[&first, other]);
    assert_eq!(check, json!({"verified": [true, false], "entries": 1}));
    let tampered = python_verify(&got[0], Some(b"{\"n\":2}"), &[&first]);
    assert_eq!(tampered["verified"], json!([false]), "the body is signed");

    let rotated = cli
        .json(&[
            "subscriptions",
            "rotate-secret",
            &id,
            "--grace-secs",
            "3600",
        ])
        .await;
    let second = s(&rotated["secret"]).to_string();
    assert!(second.starts_with("whpk_") && second != first, "{rotated}");
    let live = cli.json(&["subscriptions", "secret", &id]).await;
    assert_eq!(live["secret"], second.as_str());
    let keys: Vec<&str> = live["live_secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["secret"].as_str().unwrap())
        .collect();
    assert_eq!(keys, [second.as_str(), first.as_str()]);
    assert!(
        !live.to_string().contains("whsk_"),
        "no secret key is shown"
    );

    // The rotation reaches dispatchers as an announcement; publish until a request signed
    // after it arrives (normally the first).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 1;
    let rotated_req = loop {
        n += 1;
        publish(&cli, &tenant, n).await;
        let got = receiver
            .wait_for("ed", WAIT, "a delivery after the rotation", |r| {
                r.len() == n as usize
            })
            .await;
        let last = got.last().unwrap().clone();
        if last.header("webhook-signature").matches("v1a,").count() == 2 {
            break last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request signed with two keys"
        );
    };
    let check = python_verify(&rotated_req, None, &[&first, &second, other]);
    assert_eq!(
        check,
        json!({"verified": [true, true, false], "entries": 2})
    );
    drop(server);
    env.finish().await;
}

// ---------------------------------------------------------------------------------------
// Mutual TLS to receivers.
// ---------------------------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and two client certificates it issued, as
/// PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    server: (String, String),
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(hookline_testkit::unique_name("hookline-pki-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Hookline test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let mut pki = Pki {
            dir,
            ca,
            server: (String::new(), String::new()),
        };
        pki.server = pki.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
        for name in ["client", "other"] {
            let (cert, key) = pki.issue(
                &format!("hookline test {name}"),
                ExtendedKeyUsagePurpose::ClientAuth,
            );
            std::fs::write(pki.path(&format!("{name}.pem")), cert).unwrap();
            std::fs::write(pki.path(&format!("{name}.key")), key).unwrap();
        }
        pki
    }

    /// A certificate (PEM) and key (PEM) for `name` (a SAN for the server).
    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let sans = match usage {
            ExtendedKeyUsagePurpose::ServerAuth => vec![name.to_owned()],
            _ => vec![],
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the HTTPS receiver saw: a request (its path) from a client with a certificate,
/// or a handshake it refused.
#[derive(Debug, PartialEq)]
enum Seen {
    Request(String),
    Refused,
}

/// An HTTPS receiver on 127.0.0.1 that requires a client certificate issued by the CA.
async fn tls_receiver(pki: &Pki) -> (u16, mpsc::UnboundedReceiver<Seen>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(pki.server.0.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    let _ = tx.send(Seen::Refused);
                    return;
                };
                let path = read_request(&mut tls).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                let _ = tls.write_all(answer).await;
                let _ = tls.shutdown().await;
                let _ = tx.send(Seen::Request(path));
            });
        }
    });
    (port, rx)
}

/// Reads one HTTP/1.1 request with a `content-length` body; returns its path.
async fn read_request(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        assert!(n > 0, "the request ended early");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        assert!(n > 0, "the body ended early");
        buf.extend_from_slice(&chunk[..n]);
    }
    head.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>, what: &str) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("the receiver saw no {what}"))
        .expect("the receiver runs")
}

/// The failed delivery of `sub`, with its attempts.
async fn failed_delivery(cli: &Cli<'_>, sub: &str) -> Value {
    let list = cli
        .json_until(
            &["deliveries", "list", "--subscription", sub],
            30,
            "a failed delivery",
            |v| {
                v[0]["status"]
                    .as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case("failed"))
            },
        )
        .await;
    cli.json(&["deliveries", "get", s(&list[0]["id"])]).await
}

async fn a_receiver_requiring_a_client_certificate_gets_one_from_the_subscription(
    backend: Backend,
) {
    let pki = Pki::new();
    let (port, mut seen) = tls_receiver(&pki).await;
    let env = Env::with(backend).await;
    let ca = pki.path("ca.pem");
    let (cli, server) = serve(&env, &[POLL, ("HOOKLINE_RECEIVER_CA_FILE", &ca)]).await;
    let tenant = cli.tenant().await;
    let (cert, key, other_key) = (
        pki.path("client.pem"),
        pki.path("client.key"),
        pki.path("other.key"),
    );
    let create = |path: &str| {
        let url = format!("https://127.0.0.1:{port}/{path}");
        [
            "subscriptions",
            "create",
            "--tenant",
            &tenant,
            "--url",
            &url,
            "--retry-schedule-ms",
            "10",
        ]
        .map(str::to_owned)
    };

    let mut mismatched = create("a").to_vec();
    mismatched.extend(["--client-cert", &cert, "--client-key", &other_key].map(str::to_owned));
    let args: Vec<&str> = mismatched.iter().map(String::as_str).collect();
    let err = cli.fails(&args).await;
    assert!(
        err.contains("client_certificate.private_key_pem") && err.contains("does not belong"),
        "{err}"
    );

    let mut with = create("a").to_vec();
    with.extend(["--client-cert", &cert, "--client-key", &key].map(str::to_owned));
    let args: Vec<&str> = with.iter().map(String::as_str).collect();
    let a = cli.json(&args).await;
    let shown = &a["client_certificate"];
    assert!(s(&shown["subject"]).contains("hookline test client"), "{a}");
    assert_eq!(s(&shown["sha256_fingerprint"]).len(), 64, "{a}");
    let got = cli.json(&["subscriptions", "get", s(&a["id"])]).await;
    assert_eq!(got["client_certificate"], *shown);
    assert!(
        !got.to_string().contains("PRIVATE KEY"),
        "the key is never shown: {got}"
    );
    let args = create("b");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = cli.json(&args).await;
    assert!(b["client_certificate"].is_null(), "{b}");

    publish(&cli, &tenant, 1).await;
    let mut got = Vec::new();
    while !got.contains(&Seen::Request("/a".into())) {
        got.push(
            next_seen(
                &mut seen,
                "request from the subscription with a certificate",
            )
            .await,
        );
    }
    assert!(!got.contains(&Seen::Request("/b".into())), "{got:?}");
    let failed = failed_delivery(&cli, s(&b["id"])).await;
    let attempts = failed["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{failed}");
    for attempt in attempts {
        assert_eq!(attempt["error_class"], "tls", "{attempt}");
        assert!(
            s(&attempt["error_message"]).contains("client certificate"),
            "{attempt}"
        );
    }

    // Given a certificate later, the same subscription's retried delivery goes through.
    let b_id = s(&b["id"]);
    let updated = cli
        .json(&[
            "subscriptions",
            "update",
            b_id,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ])
        .await;
    assert!(updated["client_certificate"].is_object(), "{updated}");
    cli.json(&["deliveries", "retry", s(&failed["id"])]).await;
    while next_seen(&mut seen, "the retried request").await != Seen::Request("/b".into()) {}
    drop(server);
    env.finish().await;
}

on_both_backends!(
    v1a_signatures_verify_in_python_across_a_rotation,
    a_receiver_requiring_a_client_certificate_gets_one_from_the_subscription,
);

#[tokio::test]
async fn the_default_client_certificate_serves_subscriptions_without_one() {
    let pki = Pki::new();
    let (port, mut seen) = tls_receiver(&pki).await;
    let env = Env::with(Backend::Embedded).await;
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );

    let out = env
        .command()
        .args(["serve", "--services", "all"])
        .env("HOOKLINE_RECEIVER_CLIENT_CERT_FILE", &cert)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a certificate without its key is refused"
    );
    assert!(
        err.contains("receiver_client_cert_file and receiver_client_key_file"),
        "{err}"
    );

    let settings = [
        POLL,
        ("HOOKLINE_RECEIVER_CA_FILE", ca.as_str()),
        ("HOOKLINE_RECEIVER_CLIENT_CERT_FILE", cert.as_str()),
        ("HOOKLINE_RECEIVER_CLIENT_KEY_FILE", key.as_str()),
    ];
    let (cli, server) = serve(&env, &settings).await;
    let tenant = cli.tenant().await;
    let url = format!("https://127.0.0.1:{port}/default");
    cli.json(&[
        "subscriptions",
        "create",
        "--tenant",
        &tenant,
        "--url",
        &url,
    ])
    .await;
    publish(&cli, &tenant, 1).await;
    assert_eq!(
        next_seen(&mut seen, "a request").await,
        Seen::Request("/default".into())
    );
    drop(server);
    env.finish().await;
}
