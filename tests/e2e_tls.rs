//! TLS everywhere (issue #10 parts 1 and 2), with certificates made at test time:
//! the gRPC API (and REST and admin) in TLS through the real binary and its CLI, mutual
//! TLS refusing a client without a certificate, a certificate replaced on disk served
//! without a restart, `amqps://` failing closed against a plaintext port and delivering
//! through a TLS endpoint in front of RabbitMQ, and PostgreSQL `sslmode=verify-full`.

mod support;

use std::time::Duration;

use hookline_proto::v1 as pb;
use pb::registry_service_client::RegistryServiceClient;
use support::cli::Cli;
use support::pki::{self, Ca, Files};
use support::receiver::{Behavior, Receiver};
use support::{Backend, Env, Server, authed};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The server's TLS files: CA, certificate and key, written to `files`.
struct ServerPki {
    ca: Ca,
    ca_path: String,
    cert_path: String,
    key_path: String,
}

impl ServerPki {
    fn new(files: &Files) -> ServerPki {
        let ca = Ca::new("hookline test server CA");
        let leaf = ca.server();
        ServerPki {
            ca_path: files.write("server-ca.pem", &ca.pem),
            cert_path: files.write("tls.crt", &leaf.cert),
            key_path: files.write("tls.key", &leaf.key),
            ca,
        }
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HOOKLINE_TLS_CERT", self.cert_path.clone()),
            ("HOOKLINE_TLS_KEY", self.key_path.clone()),
        ]
    }
}

async fn serve(env: &Env, settings: &[(&'static str, String)]) -> Server {
    let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.serve_with("all", &pairs).await
}

/// `https://127.0.0.1:port` of the server's gRPC API.
fn https(server: &Server) -> String {
    server.grpc.replacen("http://", "https://", 1)
}

/// Lists tenants over gRPC with a tonic client configured by `tls`.
async fn list_tenants(server: &Server, tls: ClientTlsConfig, token: &str) -> Result<(), String> {
    let channel = Endpoint::from_shared(https(server))
        .expect("URL")
        .tls_config(tls)
        .expect("TLS config")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    RegistryServiceClient::new(channel)
        .list_tenants(authed(pb::ListTenantsRequest::default(), token))
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

/// gRPC, REST and admin in TLS; the CLI over `https://` with `--ca`; plaintext and an
/// untrusted certificate refused; the certificate replaced on disk is served next.
#[tokio::test]
async fn api_over_tls_and_certificate_reload() {
    let env = Env::with(Backend::Embedded).await;
    let files = Files::new();
    let pki = ServerPki::new(&files);
    let token = env.admin_key().await;
    let mut settings = pki.settings();
    settings.extend([
        ("HOOKLINE_TLS_REST", "true".to_string()),
        ("HOOKLINE_TLS_ADMIN", "true".to_string()),
        ("HOOKLINE_REST_ADDR", "127.0.0.1:0".to_string()),
    ]);
    let server = serve(&env, &settings).await;

    // The CLI, as a user runs it.
    let cli = Cli {
        env: &env,
        server: https(&server),
        token: token.clone(),
    };
    let made = cli
        .json(&["tenants", "create", "--name", "tls", "--ca", &pki.ca_path])
        .await;
    assert!(
        made["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{made}"
    );
    let untrusted = cli.fails(&["tenants", "list"]).await;
    assert!(
        untrusted.contains("certificate") || untrusted.contains("UnknownIssuer"),
        "without --ca the server's private CA is not trusted: {untrusted}"
    );
    // Plaintext to the TLS port gets no answer.
    let plain = Cli {
        env: &env,
        server: server.grpc.clone(),
        token: token.clone(),
    };
    plain.fails(&["tenants", "list"]).await;

    // REST (through the in-process gRPC hop) and admin, in TLS.
    let rest = server.rest.as_deref().expect("REST address");
    let rest = rest.trim_start_matches("http://");
    let (status, body) = pki::https_get(rest, &pki.ca.pem, "/v1/tenants", Some(&token))
        .await
        .expect("REST over TLS");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(made["id"].as_str().unwrap()), "{body}");
    let (status, _) = pki::https_get(&server.admin, &pki.ca.pem, "/healthz", None)
        .await
        .expect("admin over TLS");
    assert_eq!(status, 200);

    // Rotation: a certificate from another CA replaces the files; new handshakes get it.
    let grpc = server.grpc.trim_start_matches("http://").to_string();
    let next_ca = Ca::new("hookline test rotated CA");
    let next = next_ca.server();
    files.write("tls.key", &next.key);
    files.write("tls.crt", &next.cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pki::handshake(&grpc, &next_ca.pem, b"h2").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replaced certificate was not served within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        pki::handshake(&grpc, &pki.ca.pem, b"h2").await.is_err(),
        "the old certificate is still served"
    );
    let next_ca_path = files.write("next-ca.pem", &next_ca.pem);
    cli.json(&["tenants", "list", "--ca", &next_ca_path]).await;

    server.terminate().await;
    env.finish().await;
}

/// With `tls_client_ca`, a client without a certificate, or with one from another CA,
/// is refused in the handshake; one with a certificate from that CA gets in (tonic and
/// the CLI's --client-cert/--client-key).
#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let env = Env::with(Backend::Embedded).await;
    let files = Files::new();
    let pki = ServerPki::new(&files);
    let client_ca = Ca::new("hookline test client CA");
    let mut settings = pki.settings();
    settings.push((
        "HOOKLINE_TLS_CLIENT_CA",
        files.write("client-ca.pem", &client_ca.pem),
    ));
    let token = env.admin_key().await;
    let server = serve(&env, &settings).await;
    let trust = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca.pem));

    let without = list_tenants(&server, trust(), &token).await;
    assert!(without.is_err(), "a client without a certificate got in");
    let stranger = Ca::new("someone else").client();
    let other = list_tenants(
        &server,
        trust().identity(Identity::from_pem(&stranger.cert, &stranger.key)),
        &token,
    )
    .await;
    assert!(other.is_err(), "a certificate from another CA got in");
    let ours = client_ca.client();
    list_tenants(
        &server,
        trust().identity(Identity::from_pem(&ours.cert, &ours.key)),
        &token,
    )
    .await
    .expect("a client with a certificate from tls_client_ca gets in");

    let cli = Cli {
        env: &env,
        server: https(&server),
        token,
    };
    let (cert, key) = (
        files.write("client.crt", &ours.cert),
        files.write("client.key", &ours.key),
    );
    cli.fails(&["tenants", "list", "--ca", &pki.ca_path]).await;
    cli.json(&[
        "tenants",
        "list",
        "--ca",
        &pki.ca_path,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
    ])
    .await;

    server.terminate().await;
    env.finish().await;
}

/// `amqps://` to RabbitMQ's plaintext port: the server refuses to start, saying the TLS
/// handshake failed; it never talks AMQP in plaintext instead.
#[tokio::test]
async fn amqps_to_a_plaintext_port_fails_clearly() {
    let env = Env::new().await;
    let plain = hookline_testkit::amqp_url();
    let amqps = plain.replacen("amqp://", "amqps://", 1);
    assert_ne!(plain, amqps, "the test RabbitMQ URL is amqp://");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        env.command()
            .env("HOOKLINE_AMQP_URL", &amqps)
            .args(["serve", "--services", "all"])
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .output(),
    )
    .await
    .expect("hookline gives up within 60 s")
    .expect("run hookline");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started over plaintext: {stderr}");
    assert!(
        stderr.contains("TLS handshake") && stderr.contains("never falls back to plaintext"),
        "{stderr}"
    );
    env.finish().await;
}

/// `amqps://` through a TLS-terminating proxy (its own CA, given as the URL's
/// `cacertfile`) in front of RabbitMQ: events are published and delivered, and every
/// broker connection went through the proxy's TLS.
#[tokio::test]
async fn amqps_through_a_tls_endpoint_delivers() {
    let env = Env::new().await;
    let files = Files::new();
    let proxy_ca = Ca::new("hookline test broker CA");
    let ca_path = files.write("broker-ca.pem", &proxy_ca.pem);
    let plain = url::Url::parse(&hookline_testkit::amqp_url()).expect("AMQP URL");
    let upstream = format!(
        "{}:{}",
        plain.host_str().expect("host"),
        plain.port().unwrap_or(5672)
    );
    let proxy = pki::TlsProxy::start(&proxy_ca.server(), upstream).await;
    let mut amqps = plain.clone();
    amqps.set_scheme("amqps").expect("amqps scheme");
    amqps.set_host(Some("127.0.0.1")).expect("host");
    amqps.set_port(Some(proxy.addr.port())).expect("port");
    amqps.query_pairs_mut().append_pair("cacertfile", &ca_path);

    let token = env.admin_key().await;
    let server = env
        .serve_with("all", &[("HOOKLINE_AMQP_URL", amqps.as_str())])
        .await;
    let connected = proxy.handshakes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connected >= 1,
        "the broker connection did not use the TLS endpoint"
    );
    let cli = Cli {
        env: &env,
        server: server.grpc.clone(),
        token,
    };
    let receiver = Receiver::start().await;
    let (tenant, _) = cli.subscribe(&receiver, "tls", Behavior::Ok).await;
    cli.publish_until_matched(&tenant, 30).await;
    receiver
        .wait_for(
            "tls",
            Duration::from_secs(30),
            "a delivery over amqps",
            |r| r.iter().any(|r| r.verified),
        )
        .await;
    server.terminate().await;
    env.finish().await;
}

/// PostgreSQL with `ssl=on` and a certificate from the test's CA: Hookline connects
/// with `sslmode=verify-full&sslrootcert=<CA>`, and refuses a server its CA did not
/// sign. Needs a private PostgreSQL (root, `initdb`); says why when it is skipped.
#[tokio::test]
async fn postgres_verify_full() {
    if support::private::postgres_bin_if_any().is_none() {
        eprintln!("SKIPPED postgres_verify_full: no PostgreSQL server binaries (initdb) here");
        return;
    }
    let ca = Ca::new("hookline test PostgreSQL CA");
    let pg = support::private::PrivatePostgres::start_tls(&ca.server());
    let files = Files::new();
    let good = files.write("pg-ca.pem", &ca.pem);
    let wrong = files.write("other-ca.pem", &Ca::new("not the PostgreSQL CA").pem);
    let env = Env::new().await;
    let migrate = |root: String| {
        let mut cmd = env.command();
        cmd.env("HOOKLINE_DATABASE_URL", pg.url_verify_full(&root))
            .arg("migrate");
        cmd
    };
    let out = tokio::time::timeout(Duration::from_secs(60), migrate(good).output())
        .await
        .expect("migrate within 60 s")
        .expect("run hookline migrate");
    assert!(
        out.status.success(),
        "verify-full with the right CA: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::time::timeout(Duration::from_secs(60), migrate(wrong).output())
        .await
        .expect("migrate within 60 s")
        .expect("run hookline migrate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "verify-full trusted an unknown CA");
    eprintln!("verify-full with another CA: {stderr}");
    assert!(
        stderr.contains("certificate") || stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    env.finish().await;
}
