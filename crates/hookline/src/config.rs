//! Configuration: defaults that work on a laptop, then an optional TOML file, then
//! `HOOKLINE_*` environment variables, then flags — each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use hookline_core::quota::{MAX_QUOTA, Quotas};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// PostgreSQL URL (use `sslmode=disable` on loopback). With `amqp_url`, selects the
    /// distributed backends; with neither, Hookline runs embedded under `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Connections in this process's database pool.
    pub database_max_connections: u32,
    /// RabbitMQ URL; see `database_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// Where the embedded backends keep their SQLite database.
    pub data_dir: PathBuf,
    /// Prefix of every queue and exchange name.
    pub queue_prefix: String,
    /// Where the gRPC API listens (every service of this process on one port).
    pub grpc_addr: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub admin_addr: SocketAddr,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// `text` or `json`.
    pub log_format: String,
    /// Largest event payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Most HTTP requests one dispatcher process has in flight.
    pub dispatcher_concurrency: usize,
    /// Unacknowledged messages a dispatcher holds per unsharded queue (`deliveries`,
    /// `retries`: what versions before fair delivery queued).
    pub dispatcher_prefetch: u16,
    /// Unacknowledged messages a dispatcher holds per shard queue.
    pub dispatcher_shard_prefetch: u16,
    /// Shard queues per kind that deliveries are spread over (fair delivery): 1 to 256.
    /// Every process of an installation must use the same value; lowering it is safe
    /// (dispatchers keep consuming the higher shards while they exist or hold messages).
    pub delivery_shards: u16,
    /// Full batches of attempt outcomes a dispatcher writes at once (1 to 16); a partial
    /// batch waits for a write in flight to end, growing meanwhile.
    pub dispatcher_writes_in_flight: usize,
    /// Timeout of one webhook request, in milliseconds.
    pub request_timeout_ms: u64,
    /// How often the retry service reads the schedule when nothing was due, in ms.
    pub retry_poll_interval_ms: u64,
    /// How old an unconfirmed outbox entry must be before the relay re-publishes it, in ms.
    pub relay_grace_ms: u64,
    /// A `tracing` filter, like `info` or `hookline=debug,info`.
    pub log: String,

    // --- Shutdown (lifecycle) ---
    /// At SIGTERM/Ctrl-C, how long in-flight deliveries may take to finish, in seconds;
    /// the process exits at most a few seconds after (outcomes written, connections
    /// closed). Keep it under the platform's grace period (Kubernetes: 30 s). A second
    /// signal exits at once.
    pub shutdown_drain_secs: u64,

    // --- Limits before authentication and per connection (docs/SECURITY.md) ---
    /// Most gRPC connections open at once; beyond it new connections are closed at once.
    pub grpc_max_connections: usize,
    /// A new connection that has not sent one complete request by then is closed, in ms.
    pub grpc_first_request_timeout_ms: u64,
    /// Most concurrent calls (HTTP/2 streams) per connection.
    pub grpc_max_concurrent_streams: u32,
    /// How often an idle connection is pinged, and how long the answer may take, in ms.
    pub grpc_keepalive_interval_ms: u64,
    pub grpc_keepalive_timeout_ms: u64,
    /// Largest `PublishBatch` request message, in bytes.
    pub publish_batch_max_bytes: usize,
    /// Backpressure: while more messages than this wait in the work queues, `Publish`
    /// and `PublishBatch` answer `RESOURCE_EXHAUSTED` (retry in 1 s). 0: no limit.
    pub ingest_max_backlog: u64,
    /// Requests per second one API key may make (burst: one second's worth); 0: no limit.
    pub key_requests_per_second: u32,
    /// `WatchDeliveries` streams one API key may hold open at once.
    pub key_max_watch_streams: usize,

    // --- Tenant quotas (issue #9): defaults for tenants without their own (an admin sets
    // those with UpdateTenant `quotas`). Each 1 to 2,147,483,647.
    /// Most subscriptions one tenant may have.
    pub quota_subscriptions_per_tenant: u32,
    /// Most subscriptions one published event may match (more: the publish is refused).
    pub quota_deliveries_per_event: u32,
    /// Most events one tenant may publish per second, per ingest process.
    pub quota_events_per_second: u32,

    // --- Egress policy: which addresses tenants' URLs may reach (docs/SECURITY.md) ---
    /// Ranges opened beyond globally routable unicast, as CIDR blocks or addresses
    /// (`HOOKLINE_EGRESS_ALLOW=127.0.0.1/32,10.1.0.0/16`). A receiver on this machine
    /// needs `127.0.0.1/32`.
    #[serde(deserialize_with = "crate::egress_config::ranges")]
    pub egress_allow: Vec<String>,
    /// Ranges refused on top of the built-in ones; they win over `egress_allow`.
    #[serde(deserialize_with = "crate::egress_config::ranges")]
    pub egress_deny: Vec<String>,
    /// An HTTP CONNECT proxy (like Smokescreen) every webhook request goes through, for
    /// a static egress address. The proxy resolves names, so it should refuse internal
    /// ranges itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<String>,

    // --- TLS to receivers (docs/SECURITY.md, "Mutual TLS to receivers") ---
    /// A PEM client certificate chain presented to receivers that ask for one, unless the
    /// subscription carries its own; needs `receiver_client_key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver_client_cert_file: Option<PathBuf>,
    /// The PEM private key of `receiver_client_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver_client_key_file: Option<PathBuf>,
    /// PEM CA certificates trusted for receivers beside the system's (private PKI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver_ca_file: Option<PathBuf>,

    // --- REST/JSON API (crates/hookline-rest) ---
    /// Where the REST/JSON API and its OpenAPI document (`/v1/openapi.json`) listen; unset:
    /// no REST API. It calls this process's gRPC API, so it serves what that serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_addr: Option<SocketAddr>,
    /// Most REST connections open at once; beyond it new connections are closed at once.
    pub rest_max_connections: usize,

    // --- TLS (docs/SECURITY.md, "TLS") ---
    /// PEM certificate chain of the gRPC listener; with `tls_key`, the API speaks only
    /// TLS. Re-read when the file changes (no restart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; set, gRPC (and REST with `tls_rest`) clients must present a
    /// certificate they issued, or the handshake fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve the REST API in TLS too, with the same certificate and client CA.
    pub tls_rest: bool,
    /// Serve the admin HTTP port in TLS too (never asks for client certificates).
    pub tls_admin: bool,
    /// PEM CA certificates trusted for `amqps://` beside the bundled public roots (or
    /// the URL's `cacertfile` query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_ca_file: Option<PathBuf>,
    /// PEM client certificate and key for a broker that requires one (or the URL's
    /// `certfile` / `keyfile` queries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_key_file: Option<PathBuf>,
    // --- Web console and tenant portal (crates/hookline-console) ---
    /// Where the web console listens (pages under `/console`); unset: no console.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_addr: Option<SocketAddr>,
    /// CSP `frame-ancestors` of the console: `'none'` forbids embedding; list origins
    /// (`https://app.example.com`) to embed the tenant portal in an iframe.
    pub console_frame_ancestors: String,
    /// Secret (at least 32 characters) signing portal links; unset: a random one per
    /// process, so links die with it and one replica does not honour another's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_portal_secret: Option<String>,
    /// Longest lifetime a portal link may be given, in seconds.
    pub console_portal_max_ttl_secs: u64,
    /// Most console connections open at once; beyond it new connections are closed at once.
    pub console_max_connections: usize,

    // --- Secrets at rest (crates/hookline-seal, docs/SECURITY.md) ---
    /// The keyring sealing signing secrets and custom header values:
    /// `<id>:<base64 of 32 bytes>[,<id>:<key>…]`, the first key sealing, the others only
    /// opening (during a rotation). Prefer `encryption_key_file` outside development.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<SecretSetting>,
    /// A file holding the keyring, one `<id>:<key>` per line, the first sealing. With
    /// neither setting the embedded mode uses `<data_dir>/encryption.key`, made (0600) at
    /// its first start; the distributed mode stores secrets unsealed, with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: None,
            database_max_connections: 10,
            amqp_url: None,
            data_dir: PathBuf::from("hookline-data"),
            queue_prefix: "hookline".into(),
            grpc_addr: ([127, 0, 0, 1], 50051).into(),
            admin_addr: ([127, 0, 0, 1], 9090).into(),
            migrate_on_start: true,
            log_format: "text".into(),
            log: "info".into(),
            max_payload_bytes: 1024 * 1024,
            dispatcher_concurrency: 512,
            dispatcher_prefetch: 256,
            dispatcher_shard_prefetch: 64,
            delivery_shards: 16,
            dispatcher_writes_in_flight: 3,
            request_timeout_ms: 15_000,
            retry_poll_interval_ms: 500,
            relay_grace_ms: 10_000,
            shutdown_drain_secs: 10,
            grpc_max_connections: 1024,
            grpc_first_request_timeout_ms: 10_000,
            grpc_max_concurrent_streams: 100,
            grpc_keepalive_interval_ms: 30_000,
            grpc_keepalive_timeout_ms: 10_000,
            publish_batch_max_bytes: 16 * 1024 * 1024,
            ingest_max_backlog: 0,
            key_requests_per_second: 5_000,
            key_max_watch_streams: 16,
            quota_subscriptions_per_tenant: Quotas::default().subscriptions_per_tenant,
            quota_deliveries_per_event: Quotas::default().deliveries_per_event,
            quota_events_per_second: Quotas::default().events_per_second,
            egress_allow: Vec::new(),
            egress_deny: Vec::new(),
            egress_proxy: None,
            receiver_client_cert_file: None,
            receiver_client_key_file: None,
            receiver_ca_file: None,
            rest_addr: None,
            rest_max_connections: 1024,
            encryption_key: None,
            encryption_key_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_rest: false,
            tls_admin: false,
            amqp_ca_file: None,
            amqp_cert_file: None,
            amqp_key_file: None,
            console_addr: None,
            console_frame_ancestors: "'none'".into(),
            console_portal_secret: None,
            console_portal_max_ttl_secs: 24 * 3600,
            console_max_connections: 256,
        }
    }
}

/// Shortest `console_portal_secret` accepted.
const MIN_SECRET_LEN: usize = 32;
/// Bounds of `console_portal_max_ttl_secs`: a minute to a week.
const MAX_TTL_BOUNDS: (u64, u64) = (60, 7 * 24 * 3600);

/// Flags that override the file and the environment.
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub struct CliOverrides {
    /// PostgreSQL URL [env: HOOKLINE_DATABASE_URL]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// RabbitMQ URL [env: HOOKLINE_AMQP_URL]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// Data directory of the embedded backends [env: HOOKLINE_DATA_DIR]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Prefix of queue and exchange names [env: HOOKLINE_QUEUE_PREFIX]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_prefix: Option<String>,
    /// gRPC listen address [env: HOOKLINE_GRPC_ADDR]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_addr: Option<SocketAddr>,
    /// Admin HTTP listen address [env: HOOKLINE_ADMIN_ADDR]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    /// Log format, text or json [env: HOOKLINE_LOG_FORMAT]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Ranges tenants' URLs may reach beyond global unicast, comma-separated
    /// [env: HOOKLINE_EGRESS_ALLOW]
    #[arg(long, global = true, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_allow: Option<Vec<String>>,
    /// Extra refused ranges, comma-separated [env: HOOKLINE_EGRESS_DENY]
    #[arg(long, global = true, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<String>>,
    /// HTTP CONNECT proxy for webhook requests [env: HOOKLINE_EGRESS_PROXY]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<String>,
    /// REST/JSON API listen address; unset: none [env: HOOKLINE_REST_ADDR]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_addr: Option<SocketAddr>,
    /// Web console listen address; unset: none [env: HOOKLINE_CONSOLE_ADDR]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_addr: Option<SocketAddr>,
}

impl Config {
    pub fn load(file: Option<&Path>, flags: &CliOverrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            anyhow::ensure!(
                path.is_file(),
                "configuration file {} does not exist or is not a file",
                path.display()
            );
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("HOOKLINE_").ignore(&["config", "services"]))
            .merge(Serialized::defaults(flags))
            .extract()
            .context("invalid configuration")?;
        anyhow::ensure!(
            config.log_format == "text" || config.log_format == "json",
            "log_format is {:?}; allowed: text, json",
            config.log_format
        );
        anyhow::ensure!(
            config.database_max_connections >= 1,
            "database_max_connections must be at least 1"
        );
        anyhow::ensure!(
            (1..=64 * 1024 * 1024).contains(&config.max_payload_bytes),
            "max_payload_bytes is {}; allowed: 1 to 67108864 (64 MiB)",
            config.max_payload_bytes
        );
        anyhow::ensure!(
            config.dispatcher_concurrency >= 1 && config.dispatcher_prefetch >= 1,
            "dispatcher_concurrency and dispatcher_prefetch must be at least 1"
        );
        anyhow::ensure!(
            config.dispatcher_shard_prefetch >= 1,
            "dispatcher_shard_prefetch must be at least 1"
        );
        anyhow::ensure!(
            (1..=hookline_broker::MAX_SHARDS).contains(&config.delivery_shards),
            "delivery_shards is {}; allowed: 1 to {}",
            config.delivery_shards,
            hookline_broker::MAX_SHARDS
        );
        anyhow::ensure!(
            (1..=16).contains(&config.dispatcher_writes_in_flight),
            "dispatcher_writes_in_flight is {}; allowed: 1 to 16",
            config.dispatcher_writes_in_flight
        );
        anyhow::ensure!(
            config.request_timeout_ms >= 1 && config.retry_poll_interval_ms >= 1,
            "request_timeout_ms and retry_poll_interval_ms must be at least 1"
        );
        anyhow::ensure!(
            config.shutdown_drain_secs <= MAX_SHUTDOWN_DRAIN_SECS,
            "shutdown_drain_secs is {}; allowed: 0 to {MAX_SHUTDOWN_DRAIN_SECS}",
            config.shutdown_drain_secs
        );
        config.check_connection_limits()?;
        for (name, value) in [
            (
                "quota_subscriptions_per_tenant",
                config.quota_subscriptions_per_tenant,
            ),
            (
                "quota_deliveries_per_event",
                config.quota_deliveries_per_event,
            ),
            ("quota_events_per_second", config.quota_events_per_second),
        ] {
            hookline_core::validate::stored_u32(name, value, 1, MAX_QUOTA)?;
        }
        config.egress()?;
        config.tls_files()?;
        config.receiver_tls()?;
        config.check_console()?;
        Ok(config)
    }

    /// The receiver TLS settings, their files read and checked.
    pub fn receiver_tls(&self) -> anyhow::Result<hookline_dispatcher::ReceiverTls> {
        crate::receiver_tls::from_settings(
            self.receiver_client_cert_file.as_deref(),
            self.receiver_client_key_file.as_deref(),
            self.receiver_ca_file.as_deref(),
        )
    }

    /// The egress settings, checked.
    pub fn egress(&self) -> anyhow::Result<crate::egress_config::Egress> {
        crate::egress_config::Egress::from_settings(
            &self.egress_allow,
            &self.egress_deny,
            self.egress_proxy.as_deref(),
        )
    }

    /// Refuses console settings that cannot work, saying what is allowed.
    fn check_console(&self) -> anyhow::Result<()> {
        if let Some(secret) = &self.console_portal_secret {
            anyhow::ensure!(
                secret.len() >= MIN_SECRET_LEN,
                "console_portal_secret has {} characters; it needs at least {MIN_SECRET_LEN}",
                secret.len()
            );
        }
        let (lo, hi) = MAX_TTL_BOUNDS;
        anyhow::ensure!(
            (lo..=hi).contains(&self.console_portal_max_ttl_secs),
            "console_portal_max_ttl_secs is {}; allowed: {lo} to {hi}",
            self.console_portal_max_ttl_secs
        );
        anyhow::ensure!(
            self.console_max_connections >= 1,
            "console_max_connections must be at least 1"
        );
        let ancestors = self.console_frame_ancestors.trim();
        anyhow::ensure!(
            !ancestors.is_empty()
                && ancestors.len() <= 1000
                && ancestors.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                && !ancestors.contains([';', ',']),
            "console_frame_ancestors is {ancestors:?}; allowed: 'none', 'self' or origins separated by spaces"
        );
        Ok(())
    }

    /// The limits before authentication and per connection.
    fn check_connection_limits(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.grpc_max_connections >= 1
                && self.grpc_max_concurrent_streams >= 1
                && self.key_max_watch_streams >= 1,
            "grpc_max_connections, grpc_max_concurrent_streams and key_max_watch_streams must be at least 1"
        );
        anyhow::ensure!(
            self.grpc_first_request_timeout_ms >= 1
                && self.grpc_keepalive_interval_ms >= 1
                && self.grpc_keepalive_timeout_ms >= 1,
            "grpc_first_request_timeout_ms, grpc_keepalive_interval_ms and grpc_keepalive_timeout_ms must be at least 1"
        );
        anyhow::ensure!(
            (1024..=256 * 1024 * 1024).contains(&self.publish_batch_max_bytes),
            "publish_batch_max_bytes is {}; allowed: 1024 to 268435456 (256 MiB)",
            self.publish_batch_max_bytes
        );
        Ok(())
    }

    /// The connection settings of the gRPC server.
    pub fn conn_limits(&self) -> hookline_grpc::conn::ConnLimits {
        use std::time::Duration;
        hookline_grpc::conn::ConnLimits {
            max_connections: self.grpc_max_connections,
            first_request_timeout: Duration::from_millis(self.grpc_first_request_timeout_ms),
            max_concurrent_streams: self.grpc_max_concurrent_streams,
            keepalive_interval: Duration::from_millis(self.grpc_keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(self.grpc_keepalive_timeout_ms),
        }
    }

    /// The TLS files of the API listeners, or `None` when they serve plaintext.
    pub fn tls_files(&self) -> anyhow::Result<Option<hookline_grpc::tls::TlsFiles>> {
        let files = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(hookline_grpc::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            (None, None) => None,
            _ => anyhow::bail!(
                "tls_cert and tls_key go together: set both (HOOKLINE_TLS_CERT, HOOKLINE_TLS_KEY) or neither"
            ),
        };
        anyhow::ensure!(
            files.is_some() || !(self.tls_client_ca.is_some() || self.tls_rest || self.tls_admin),
            "tls_client_ca, tls_rest and tls_admin need tls_cert and tls_key"
        );
        Ok(files)
    }

    /// What an `amqps://` broker connection trusts and presents.
    pub fn amqp_tls(&self) -> hookline_broker::AmqpTlsFiles {
        hookline_broker::AmqpTlsFiles {
            ca_file: self.amqp_ca_file.clone(),
            cert_file: self.amqp_cert_file.clone(),
            key_file: self.amqp_key_file.clone(),
        }
    }

    /// The limits per API key.
    pub fn key_limits(&self) -> hookline_grpc::keys::KeyLimitsConfig {
        hookline_grpc::keys::KeyLimitsConfig {
            requests_per_second: self.key_requests_per_second,
            max_watch_streams: self.key_max_watch_streams,
        }
    }

    /// The quotas of tenants without their own.
    pub fn quotas(&self) -> Quotas {
        Quotas {
            subscriptions_per_tenant: self.quota_subscriptions_per_tenant,
            deliveries_per_event: self.quota_deliveries_per_event,
            events_per_second: self.quota_events_per_second,
        }
    }
}

/// The longest shutdown drain accepted: a stop should not take more than minutes.
const MAX_SHUTDOWN_DRAIN_SECS: u64 = 600;

/// A setting that is a secret: read like a string, never shown by `Debug`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretSetting(pub String);

impl std::fmt::Debug for SecretSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}
