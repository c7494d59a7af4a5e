//! Configuration: defaults that work on a laptop, then an optional TOML file, then
//! `HOOKLINE_*` environment variables, then flags — each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
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
    /// Unacknowledged messages a dispatcher holds per queue.
    pub dispatcher_prefetch: u16,
    /// Timeout of one webhook request, in milliseconds.
    pub request_timeout_ms: u64,
    /// How often the retry service reads the schedule when nothing was due, in ms.
    pub retry_poll_interval_ms: u64,
    /// How old an unconfirmed outbox entry must be before the relay re-publishes it, in ms.
    pub relay_grace_ms: u64,
    /// A `tracing` filter, like `info` or `hookline=debug,info`.
    pub log: String,

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
            request_timeout_ms: 15_000,
            retry_poll_interval_ms: 500,
            relay_grace_ms: 10_000,
            egress_allow: Vec::new(),
            egress_deny: Vec::new(),
            egress_proxy: None,
        }
    }
}

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
            config.request_timeout_ms >= 1 && config.retry_poll_interval_ms >= 1,
            "request_timeout_ms and retry_poll_interval_ms must be at least 1"
        );
        crate::egress_config::Egress::from_config(&config)?;
        Ok(config)
    }
}
