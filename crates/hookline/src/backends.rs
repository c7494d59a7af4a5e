//! Which storage and queue the process runs on, decided from the configuration.
//!
//! No database and no broker configured: the embedded backends, SQLite and the
//! in-process durable queue in the same SQLite file under `data_dir`, for one process
//! running every service. Both `database_url` and `amqp_url` set: PostgreSQL and
//! RabbitMQ, for any set of services in any number of processes. Anything in between is
//! refused with a message that says what to set. Everything above this module sees only
//! the storage and queue ports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use hookline_broker::{Broker, EmbeddedBroker, EmbeddedConfig, RabbitBroker, RabbitConfig};
use hookline_core::redact;
use hookline_seal::Keyring;
use hookline_store::port::{DeliveryStore, EventStore, RegistryStore, StoreHealth};
use hookline_store::sealing::SealedRows;
use hookline_store::{PgStore, SealedRegistry, SqliteStore};
use sqlx::migrate::MigrateDatabase;

use crate::config::Config;
use crate::services::Service;

/// The file of the embedded database inside the data directory.
const SQLITE_FILE: &str = "hookline.db";

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// SQLite and the in-process queue under this directory.
    Embedded { data_dir: PathBuf },
    /// PostgreSQL and RabbitMQ.
    Distributed {
        database_url: String,
        amqp_url: String,
    },
}

impl Mode {
    /// The mode the configuration asks for, or why it is inconsistent.
    pub fn from_config(config: &Config) -> anyhow::Result<Mode> {
        let db = config.database_url.as_deref().filter(|s| !s.is_empty());
        let amqp = config.amqp_url.as_deref().filter(|s| !s.is_empty());
        match (db, amqp) {
            (None, None) => Ok(Mode::Embedded {
                data_dir: config.data_dir.clone(),
            }),
            (Some(database_url), Some(amqp_url)) => Ok(Mode::Distributed {
                database_url: database_url.to_string(),
                amqp_url: amqp_url.to_string(),
            }),
            (Some(_), None) => bail!(
                "HOOKLINE_DATABASE_URL is set but HOOKLINE_AMQP_URL is not: the distributed \
                 backends need both (PostgreSQL and RabbitMQ). Set HOOKLINE_AMQP_URL=amqp://…, \
                 or unset HOOKLINE_DATABASE_URL to run embedded on SQLite under data_dir"
            ),
            (None, Some(_)) => bail!(
                "HOOKLINE_AMQP_URL is set but HOOKLINE_DATABASE_URL is not: the distributed \
                 backends need both (PostgreSQL and RabbitMQ). Set \
                 HOOKLINE_DATABASE_URL=postgres://…, or unset HOOKLINE_AMQP_URL to run \
                 embedded on SQLite under data_dir"
            ),
        }
    }

    /// Refuses a partial set of services on the embedded backends.
    pub fn check_services(&self, services: &BTreeSet<Service>) -> anyhow::Result<()> {
        if matches!(self, Mode::Embedded { .. }) && services.len() < Service::ALL.len() {
            let names: Vec<_> = services.iter().map(|s| s.to_string()).collect();
            bail!(
                "--services {} needs the distributed backends: the embedded backends (SQLite \
                 and an in-process queue) live inside one process, so services running alone \
                 could not reach each other's queue. Run all four services (the default), or \
                 set HOOKLINE_DATABASE_URL=postgres://… and HOOKLINE_AMQP_URL=amqp://… to run \
                 services in separate processes",
                names.join(",")
            );
        }
        Ok(())
    }
}

/// The store of either backend, behind every storage port; with a keyring attached
/// ([`crate::encryption::attach`]) the registry port seals secrets at rest.
pub struct AnyStore {
    adapter: Adapter,
    keyring: Option<Arc<Keyring>>,
}

/// The adapter of either backend.
pub enum Adapter {
    Postgres(Arc<PgStore>),
    Sqlite(Arc<SqliteStore>),
}

impl AnyStore {
    fn new(adapter: Adapter) -> Self {
        Self {
            adapter,
            keyring: None,
        }
    }

    /// Seals and opens secrets under `keyring` from now on.
    pub fn set_keyring(&mut self, keyring: Arc<Keyring>) {
        self.keyring = Some(keyring);
    }

    /// The raw rows of the sealed columns, for sealing and key rotation.
    pub fn sealed_rows(&self) -> &dyn SealedRows {
        match &self.adapter {
            Adapter::Postgres(s) => s.as_ref(),
            Adapter::Sqlite(s) => s.as_ref(),
        }
    }

    pub fn registry(&self) -> Arc<dyn RegistryStore> {
        let raw: Arc<dyn RegistryStore> = match &self.adapter {
            Adapter::Postgres(s) => s.clone(),
            Adapter::Sqlite(s) => s.clone(),
        };
        match &self.keyring {
            Some(keyring) => Arc::new(SealedRegistry::new(raw, keyring.clone())),
            None => raw,
        }
    }
    pub fn events(&self) -> Arc<dyn EventStore> {
        match &self.adapter {
            Adapter::Postgres(s) => s.clone(),
            Adapter::Sqlite(s) => s.clone(),
        }
    }
    pub fn deliveries(&self) -> Arc<dyn DeliveryStore> {
        match &self.adapter {
            Adapter::Postgres(s) => s.clone(),
            Adapter::Sqlite(s) => s.clone(),
        }
    }
    pub fn health(&self) -> Arc<dyn StoreHealth> {
        match &self.adapter {
            Adapter::Postgres(s) => s.clone(),
            Adapter::Sqlite(s) => s.clone(),
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        match &self.adapter {
            Adapter::Postgres(s) => s.migrate().await,
            Adapter::Sqlite(s) => s.migrate().await,
        }
        .context("applying migrations")
    }

    pub async fn close(&self) {
        match &self.adapter {
            Adapter::Postgres(s) => s.close().await,
            Adapter::Sqlite(s) => s.close().await,
        }
    }
}

/// Where the store lives: all that commands touching only the database (`migrate`,
/// `admin create-key`) need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAt {
    /// PostgreSQL at this URL.
    Postgres(String),
    /// SQLite under this data directory.
    Sqlite(PathBuf),
}

impl StoreAt {
    /// The store the configuration names, without asking for a broker: the database URL
    /// when set (the broker URL may be absent), otherwise the embedded data directory.
    pub fn from_config(config: &Config) -> anyhow::Result<StoreAt> {
        let db = config.database_url.as_deref().filter(|s| !s.is_empty());
        let amqp = config.amqp_url.as_deref().filter(|s| !s.is_empty());
        match (db, amqp) {
            (Some(url), _) => Ok(StoreAt::Postgres(url.to_string())),
            (None, None) => Ok(StoreAt::Sqlite(config.data_dir.clone())),
            (None, Some(_)) => bail!(
                "HOOKLINE_AMQP_URL is set but HOOKLINE_DATABASE_URL is not: this command works \
                 on the database only. Set HOOKLINE_DATABASE_URL=postgres://… for the \
                 distributed backends, or unset HOOKLINE_AMQP_URL to use the embedded \
                 database under data_dir"
            ),
        }
    }
}

impl Mode {
    /// Where this mode's store lives.
    pub fn store(&self) -> StoreAt {
        match self {
            Mode::Distributed { database_url, .. } => StoreAt::Postgres(database_url.clone()),
            Mode::Embedded { data_dir } => StoreAt::Sqlite(data_dir.clone()),
        }
    }
}

/// Opens the store at `at`, creating the PostgreSQL database or the data directory
/// when missing (`serve`, `migrate`).
pub async fn open_store(at: &StoreAt, config: &Config) -> anyhow::Result<AnyStore> {
    match at {
        StoreAt::Postgres(database_url) => {
            let exists = sqlx::Postgres::database_exists(database_url)
                .await
                .with_context(|| {
                    format!("cannot reach PostgreSQL at {}", redact::url(database_url))
                })?;
            if !exists {
                sqlx::Postgres::create_database(database_url)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot create the database of {}",
                            redact::url(database_url)
                        )
                    })?;
                tracing::info!("created database");
            }
            let store = PgStore::connect(database_url, config.database_max_connections)
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to PostgreSQL at {}",
                        redact::url(database_url)
                    )
                })?;
            Ok(AnyStore::new(Adapter::Postgres(Arc::new(store))))
        }
        StoreAt::Sqlite(data_dir) => {
            let file = prepare_data_dir(data_dir)?;
            open_sqlite(&file).await
        }
    }
}

/// Opens the store at `at` only if it already exists (`admin create-key`): an embedded
/// data directory that is not there is named, with how to point at the right one, and
/// never created.
pub async fn open_existing_store(at: &StoreAt, config: &Config) -> anyhow::Result<AnyStore> {
    let StoreAt::Sqlite(data_dir) = at else {
        return open_store(at, config).await;
    };
    let file = data_dir.join(SQLITE_FILE);
    if !file.is_file() {
        let shown = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.clone());
        bail!(
            "no Hookline data directory at {} (looked for {}); nothing was created. Point at \
             the directory your `hookline serve` uses with --data-dir <dir> or \
             HOOKLINE_DATA_DIR=<dir> (a relative path starts from the current directory), \
             or set HOOKLINE_DATABASE_URL and HOOKLINE_AMQP_URL for a PostgreSQL \
             installation. A new installation gets its first admin key from the first \
             `hookline serve`",
            shown.display(),
            shown.join(SQLITE_FILE).display()
        );
    }
    open_sqlite(&file).await
}

async fn open_sqlite(file: &Path) -> anyhow::Result<AnyStore> {
    let store = SqliteStore::open(file)
        .await
        .with_context(|| format!("cannot open the embedded database {}", file.display()))?;
    Ok(AnyStore::new(Adapter::Sqlite(Arc::new(store))))
}

/// Creates the data directory if needed, checks it is writable and makes it private
/// (0700, its files 0600); returns the path of the database file.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the data directory {}; choose another with --data-dir or HOOKLINE_DATA_DIR",
            dir.display()
        )
    })?;
    let probe = dir.join(".hookline-write-test");
    std::fs::write(&probe, b"ok").with_context(|| {
        format!(
            "the data directory {} is not writable; choose another with --data-dir or HOOKLINE_DATA_DIR",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    let file = dir.join(SQLITE_FILE);
    crate::data_dir::make_private(dir, &file)?;
    Ok(file)
}

/// Connects the queue of `mode`; the embedded queue shares the SQLite store's file.
pub async fn open_broker(
    mode: &Mode,
    config: &Config,
    store: &AnyStore,
    connection_name: String,
) -> anyhow::Result<Arc<dyn Broker>> {
    Ok(match (mode, &store.adapter) {
        (Mode::Distributed { amqp_url, .. }, _) => {
            let mut rabbit = RabbitConfig::new(amqp_url.clone(), config.queue_prefix.clone());
            rabbit.connection_name = connection_name;
            rabbit.tls = config.amqp_tls();
            rabbit.delivery_shards = config.delivery_shards;
            Arc::new(RabbitBroker::connect(rabbit).await.with_context(|| {
                format!("cannot connect to RabbitMQ at {}", redact::url(amqp_url))
            })?)
        }
        (Mode::Embedded { .. }, Adapter::Sqlite(sqlite)) => {
            let embedded = EmbeddedConfig {
                delivery_shards: config.delivery_shards,
                ..EmbeddedConfig::default()
            };
            Arc::new(
                EmbeddedBroker::open(sqlite.pool().clone(), embedded)
                    .await
                    .context("cannot open the embedded queue")?,
            )
        }
        (Mode::Embedded { .. }, Adapter::Postgres(_)) => {
            bail!("the embedded queue needs the embedded (SQLite) store")
        }
    })
}
