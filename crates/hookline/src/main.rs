//! `hookline`: one binary for every role. `serve` runs any set of services, `migrate`
//! prepares the database, `admin` holds the bootstrap commands that need no server.

mod admin_http;
mod backends;
mod client;
mod config;
mod egress_config;
mod elsewhere;
mod keys;
mod metrics_catalog;
mod serve;
mod shutdown;
mod tail;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{CliOverrides, Config};

#[derive(Parser)]
#[command(
    name = "hookline",
    version,
    about = "Self-hosted webhook delivery: publish once over gRPC, delivered signed and retried."
)]
struct Cli {
    /// A TOML configuration file; `HOOKLINE_*` variables and flags override it.
    #[arg(long, global = true, env = "HOOKLINE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: CliOverrides,
    #[command(flatten)]
    client: client::ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs Hookline services until SIGTERM or Ctrl-C.
    Serve {
        /// Which services to run, comma-separated, or `all`.
        #[arg(long, env = "HOOKLINE_SERVICES", default_value = "all")]
        services: String,
    },
    /// Publishes an event to a running server.
    Publish(client::PublishArgs),
    /// Tenants of a running server.
    #[command(subcommand)]
    Tenants(client::TenantCommand),
    /// Subscriptions of a running server.
    #[command(subcommand)]
    Subscriptions(client::SubscriptionCommand),
    /// Deliveries of a running server: inspect, retry, replay.
    #[command(subcommand)]
    Deliveries(client::DeliveryCommand),
    /// Follows deliveries and their outcomes as they happen.
    Tail(tail::TailArgs),
    /// Creates the database if needed and applies every migration.
    Migrate,
    /// Administration that works without a running server.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Benchmarks a spawned or running server end to end (see `hookline bench --list`).
    Bench(hookline_bench::BenchArgs),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Creates an API key directly in the database and prints its token once.
    CreateKey {
        /// A name for people.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Scope the key to this tenant; without it the key is an admin key.
        #[arg(long)]
        tenant: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Whatever is still running past a bounded stop must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // ring is the one rustls crypto provider in the build; install it before any TLS use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Client commands need no server configuration.
    match cli.command {
        Command::Publish(args) => return client::publish(&cli.client, args).await,
        Command::Tenants(cmd) => return client::tenants(&cli.client, cmd).await,
        Command::Subscriptions(cmd) => return client::subscriptions(&cli.client, cmd).await,
        Command::Deliveries(cmd) => return client::deliveries(&cli.client, cmd).await,
        Command::Tail(args) => return tail::tail(&cli.client, args).await,
        Command::Bench(args) => return Ok(hookline_bench::run(args).await?),
        _ => {}
    }
    let config = Config::load(cli.config.as_deref(), &cli.overrides)?;
    // Logs, and traces when OTEL_EXPORTER_OTLP_ENDPOINT is set. Held to the end of `run`,
    // after the services have stopped, so dropping it exports the last spans.
    let _telemetry = hookline_telemetry::init(&config.log, config.log_format == "json")?;
    match cli.command {
        Command::Serve { services } => {
            let services = serve::parse_services(&services)?;
            serve::serve(config, services).await
        }
        Command::Migrate => {
            let at = backends::StoreAt::from_config(&config)?;
            let store = backends::open_store(&at, &config).await?;
            store.migrate().await?;
            store.close().await;
            println!("migrations applied");
            Ok(())
        }
        Command::Admin(AdminCommand::CreateKey { name, tenant }) => {
            let at = backends::StoreAt::from_config(&config)?;
            // A key in a store no server uses would be a lost key: never create one.
            let store = backends::open_existing_store(&at, &config).await?;
            store.migrate().await?;
            let created =
                keys::create_key(store.registry().as_ref(), &name, tenant.as_deref()).await;
            store.close().await;
            let created = created?;
            println!("{created}");
            Ok(())
        }
        Command::Publish(_)
        | Command::Tenants(_)
        | Command::Subscriptions(_)
        | Command::Deliveries(_)
        | Command::Tail(_)
        | Command::Bench(_) => Ok(()),
    }
}
