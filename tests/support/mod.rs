//! What the end-to-end tests share: a `hookline` child process on a database and a
//! queue prefix of its own, the ports it printed, and small HTTP/gRPC helpers.

#![allow(dead_code)]

pub mod browser;
pub mod cli;
pub mod private;
pub mod receiver;
pub mod tenant;

/// Turns `async fn name(backend: Backend)` test bodies into one `#[tokio::test]` per
/// backend: `distributed::name` (PostgreSQL + RabbitMQ) and `embedded::name`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod distributed {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Distributed).await
            })*
        }
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Embedded).await
            })*
        }
    };
}

use std::process::Stdio;
use std::time::Duration;

use hookline_testkit::TestDb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_hookline");

/// The egress ranges the end-to-end servers allow: the tests' receivers on 127.0.0.1.
pub const LOOPBACK_RECEIVERS: &str = "127.0.0.1/32";

/// Which backends a test runs Hookline on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL and RabbitMQ.
    Distributed,
    /// SQLite and the in-process queue under a data directory.
    Embedded,
}

/// A database (or data directory) and queue prefix for one test; every process of the
/// test shares them.
pub struct Env {
    pub backend: Backend,
    pub db: Option<TestDb>,
    pub data_dir: std::path::PathBuf,
    pub prefix: String,
}

impl Env {
    /// PostgreSQL and RabbitMQ.
    pub async fn new() -> Self {
        Self::with(Backend::Distributed).await
    }

    pub async fn with(backend: Backend) -> Self {
        let db = match backend {
            Backend::Distributed => Some(TestDb::create().await),
            Backend::Embedded => None,
        };
        Env {
            backend,
            db,
            data_dir: std::env::temp_dir().join(hookline_testkit::unique_name("hookline-e2e-")),
            prefix: hookline_testkit::unique_name("test_e2e_"),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        match &self.db {
            Some(db) => {
                cmd.env("HOOKLINE_DATABASE_URL", db.url())
                    .env("HOOKLINE_AMQP_URL", hookline_testkit::amqp_url());
            }
            None => {
                cmd.env_remove("HOOKLINE_DATABASE_URL")
                    .env_remove("HOOKLINE_AMQP_URL");
            }
        }
        cmd.env("HOOKLINE_DATA_DIR", &self.data_dir)
            .env("HOOKLINE_QUEUE_PREFIX", &self.prefix)
            .env("HOOKLINE_DATABASE_MAX_CONNECTIONS", "4")
            .env("HOOKLINE_LOG", "warn")
            // The tests' receivers listen on loopback, which the egress policy refuses by
            // default; tests of the default pass their own HOOKLINE_EGRESS_ALLOW.
            .env("HOOKLINE_EGRESS_ALLOW", LOOPBACK_RECEIVERS)
            .env_remove("HOOKLINE_EGRESS_DENY")
            .env_remove("HOOKLINE_EGRESS_PROXY")
            .env_remove("HOOKLINE_CONFIG")
            .kill_on_drop(true);
        cmd
    }

    /// The event store of the test's backend, opened beside the server.
    pub async fn event_store(&self) -> std::sync::Arc<dyn hookline_store::port::EventStore> {
        self.stores().await.0
    }

    /// The registry store of the test's backend, opened beside the server.
    pub async fn registry_store(&self) -> std::sync::Arc<dyn hookline_store::port::RegistryStore> {
        self.stores().await.1
    }

    async fn stores(
        &self,
    ) -> (
        std::sync::Arc<dyn hookline_store::port::EventStore>,
        std::sync::Arc<dyn hookline_store::port::RegistryStore>,
    ) {
        match &self.db {
            Some(db) => {
                let store = std::sync::Arc::new(
                    hookline_store::PgStore::connect(db.url(), 2)
                        .await
                        .expect("connect to the test database"),
                );
                (store.clone(), store)
            }
            None => {
                let store = std::sync::Arc::new(
                    hookline_store::SqliteStore::open(&self.data_dir.join("hookline.db"))
                        .await
                        .expect("open the embedded database"),
                );
                (store.clone(), store)
            }
        }
    }

    /// Runs `hookline admin create-key` and returns the token it printed. On the embedded
    /// backends `hookline migrate` creates the data directory first (`create-key` never
    /// creates one).
    pub async fn admin_key(&self) -> String {
        if self.backend == Backend::Embedded {
            self.run_ok(&["migrate"]).await;
        }
        create_key(self.command()).await
    }

    /// Runs `hookline <args>` to its end, requires success, and returns its stdout.
    pub async fn run_ok(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run hookline {args:?}: {e}"));
        assert!(
            out.status.success(),
            "hookline {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn serve(&self, services: &str) -> Server {
        self.serve_with(services, &[]).await
    }

    /// `hookline serve` with extra `HOOKLINE_*` settings.
    pub async fn serve_with(&self, services: &str, settings: &[(&str, &str)]) -> Server {
        self.spawn_serve(services, "127.0.0.1:0", settings, Stdio::inherit())
            .await
    }

    /// `hookline serve` with its gRPC API on `grpc_addr` (a fixed port lets a restarted
    /// server be found where clients left it).
    pub async fn serve_on(
        &self,
        services: &str,
        grpc_addr: &str,
        settings: &[(&str, &str)],
    ) -> Server {
        self.spawn_serve(services, grpc_addr, settings, Stdio::inherit())
            .await
    }

    /// `hookline serve` with extra settings and its stderr (the logs) sent to `stderr`.
    pub async fn serve_logging(
        &self,
        services: &str,
        settings: &[(&str, &str)],
        stderr: Stdio,
    ) -> Server {
        self.spawn_serve(services, "127.0.0.1:0", settings, stderr)
            .await
    }

    async fn spawn_serve(
        &self,
        services: &str,
        grpc_addr: &str,
        settings: &[(&str, &str)],
        stderr: Stdio,
    ) -> Server {
        let mut cmd = self.command();
        cmd.envs(settings.iter().copied())
            .args(["serve", "--services", services])
            .args(["--grpc-addr", grpc_addr, "--admin-addr", "127.0.0.1:0"])
            .stderr(stderr);
        spawn_serve(cmd).await
    }

    /// Drops the test's database and its queues and exchanges, or its data directory.
    pub async fn finish(self) {
        if let Some(db) = self.db {
            let cfg = hookline_broker::RabbitConfig::new(
                hookline_testkit::amqp_url(),
                self.prefix.clone(),
            );
            if let Ok(broker) = hookline_broker::RabbitBroker::connect(cfg).await {
                let _ = broker.delete_topology().await;
                broker.close().await;
            }
            db.drop_db().await;
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Runs `hookline admin create-key` with `cmd` (a `hookline` command carrying the
/// backend settings) and returns the token it printed.
pub async fn create_key(mut cmd: Command) -> String {
    let out = cmd
        .args(["admin", "create-key", "--name", "e2e"])
        .output()
        .await
        .expect("run hookline admin create-key");
    assert!(
        out.status.success(),
        "create-key failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("hl_"))
        .unwrap_or_else(|| panic!("no token in {stdout:?}"))
        .trim()
        .to_string()
}

/// Spawns `cmd` (a complete `hookline serve …` command; stderr as the caller set it) and
/// waits until it printed where it listens.
pub async fn spawn_serve(mut cmd: Command) -> Server {
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hookline serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut grpc, mut admin, mut rest, mut console) = (None, None, None, None);
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        while grpc.is_none() || admin.is_none() {
            let line = lines
                .next_line()
                .await
                .expect("read stdout")
                .expect("hookline exited before listening");
            if let Some(a) = line.strip_prefix("hookline: grpc listening on ") {
                grpc = Some(a.to_string());
            }
            if let Some(a) = line.strip_prefix("hookline: admin listening on ") {
                admin = Some(a.to_string());
            }
            // Printed before the gRPC line when `rest_addr` is set.
            if let Some(a) = line.strip_prefix("hookline: rest listening on ") {
                rest = Some(format!("http://{a}"));
            }
            if let Some(a) = line.strip_prefix("hookline: console listening on ") {
                console = Some(format!("http://{a}"));
            }
        }
    })
    .await;
    assert!(
        started.is_ok(),
        "hookline did not start listening within 60 s"
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server {
        child,
        grpc: format!("http://{}", grpc.unwrap_or_default()),
        admin: admin.unwrap_or_default(),
        rest,
        console,
    }
}

/// A running `hookline serve`.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:port` of the gRPC API.
    pub grpc: String,
    /// `127.0.0.1:port` of the admin HTTP port.
    pub admin: String,
    /// `http://127.0.0.1:port` of the REST API, when `HOOKLINE_REST_ADDR` was set.
    pub rest: Option<String>,
    /// `http://127.0.0.1:port` of the web console, when `HOOKLINE_CONSOLE_ADDR` was set.
    pub console: Option<String>,
}

impl Server {
    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("hookline exits within 30 s of SIGTERM")
            .expect("wait for hookline")
    }
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

/// A gRPC channel to a running server.
pub async fn channel(server: &Server) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(server.grpc.clone())
        .expect("a valid URL")
        .connect()
        .await
        .expect("connect to hookline")
}

/// Creates a tenant with an admin key (and the quotas given, if any); returns its id.
pub async fn create_tenant(
    channel: &tonic::transport::Channel,
    admin: &str,
    name: &str,
    quotas: Option<hookline_proto::v1::TenantQuotas>,
) -> String {
    hookline_proto::v1::registry_service_client::RegistryServiceClient::new(channel.clone())
        .create_tenant(authed(
            hookline_proto::v1::CreateTenantRequest {
                name: name.into(),
                quotas,
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("create a tenant")
        .into_inner()
        .id
}
