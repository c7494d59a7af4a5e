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

    // --- Tenant quotas (issue #9): defaults for tenants without their own (an admin sets
    // those with UpdateTenant `quotas`). Each 1 to 2,147,483,647.
    /// Most subscriptions one tenant may have.
    pub quota_subscriptions_per_tenant: u32,
    /// Most subscriptions one published event may match (more: the publish is refused).
    pub quota_deliveries_per_event: u32,
    /// Most events one tenant may publish per second, per ingest process.
    pub quota_events_per_second: u32,
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
            quota_subscriptions_per_tenant: Quotas::default().subscriptions_per_tenant,
            quota_deliveries_per_event: Quotas::default().deliveries_per_event,
            quota_events_per_second: Quotas::default().events_per_second,
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
        Ok(config)
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
