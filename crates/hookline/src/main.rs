//! `hookline`: one binary for every role. `serve` runs any set of services, `migrate`
//! prepares the database, `admin` holds the bootstrap commands that need no server; the
//! other commands are clients of a running server (see `client`).

mod admin_http;
mod backends;
mod client;
mod config;
mod console;
mod data_dir;
mod egress_config;
mod elsewhere;
mod encryption;
mod keys;
mod metrics_catalog;
mod receiver_tls;
mod rest;
mod serve;
mod services;
mod shutdown;
mod stdout;
mod tail;
mod weights;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{CliOverrides, Config};

#[derive(Parser)]
#[command(
    name = "hookline",
    version,
    about = "Self-hosted webhook delivery: publish once over gRPC, delivered signed and retried."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The settings of the commands that run or administer an installation (`serve`,
/// `migrate`, `admin`); the client commands talk to a server and take none of them.
#[derive(Debug, Args)]
struct ServerArgs {
    /// A TOML configuration file; `HOOKLINE_*` variables and flags override it.
    #[arg(long, global = true, env = "HOOKLINE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: CliOverrides,
}

#[derive(Subcommand)]
enum Command {
    /// Runs Hookline services until SIGTERM or Ctrl-C.
    Serve {
        /// Which services to run, comma-separated, or `all`.
        #[arg(long, env = "HOOKLINE_SERVICES", default_value = "all")]
        services: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Publishes an event to a running server.
    Publish {
        #[command(flatten)]
        event: client::PublishArgs,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Events of a running server, with their payloads.
    Events {
        #[command(subcommand)]
        command: client::EventCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Tenants of a running server.
    Tenants {
        #[command(subcommand)]
        command: client::TenantCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Subscriptions of a running server, and their signing secrets.
    Subscriptions {
        #[command(subcommand)]
        command: client::SubscriptionCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// API keys of a running server.
    Keys {
        #[command(subcommand)]
        command: client::KeyCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// The event-type catalogue of a running server.
    EventTypes {
        #[command(subcommand)]
        command: client::EventTypeCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Deliveries of a running server: inspect, retry, replay.
    Deliveries {
        #[command(subcommand)]
        command: client::DeliveryCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Follows deliveries and their outcomes as they happen.
    Tail {
        #[command(flatten)]
        tail: tail::TailArgs,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Creates the database if needed and applies every migration.
    Migrate {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Administration that works without a running server.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Benchmarks a spawned or running server end to end (see `hookline bench --list`).
    #[cfg(feature = "bench")]
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
        /// Print one JSON object (`id`, `name`, `tenant_id`, `token`).
        #[arg(long)]
        json: bool,
    },
    /// Re-seals every stored secret under the current (first) encryption key while the
    /// others still open what they sealed; afterwards the old keys can be removed.
    RotateEncryptionKey,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(client_flags_after_command(std::env::args_os().collect()));
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
    let server = match cli.command {
        Command::Publish { event, client } => return client::publish(&client, event).await,
        Command::Events { command, client } => return client::events(&client, command).await,
        Command::Tenants { command, client } => return client::tenants(&client, command).await,
        Command::Subscriptions { command, client } => {
            return client::subscriptions(&client, command).await;
        }
        Command::Keys { command, client } => return client::keys(&client, command).await,
        Command::EventTypes { command, client } => {
            return client::event_types(&client, command).await;
        }
        Command::Deliveries { command, client } => {
            return client::deliveries(&client, command).await;
        }
        Command::Tail { tail, client } => return tail::tail(&client, tail).await,
        #[cfg(feature = "bench")]
        Command::Bench(args) => return Ok(hookline_bench::run(args).await?),
        Command::Serve { services, server } => {
            Server::Serve(services::parse_services(&services)?, server)
        }
        Command::Migrate { server } => Server::Migrate(server),
        Command::Admin { command, server } => Server::Admin(command, server),
    };
    let args = server.args();
    let config = Config::load(args.config.as_deref(), &args.overrides)?;
    // Logs, and traces when OTEL_EXPORTER_OTLP_ENDPOINT is set. Held to the end of `run`,
    // after the services have stopped, so dropping it exports the last spans.
    let _telemetry = hookline_telemetry::init(&config.log, config.log_format == "json")?;
    match server {
        Server::Serve(services, _) => serve::serve(config, services).await,
        Server::Migrate(_) => {
            let at = backends::StoreAt::from_config(&config)?;
            let mut store = backends::open_store(&at, &config).await?;
            store.migrate().await?;
            // Rows written before sealing are sealed as part of the migration.
            let attached = encryption::attach(&mut store, &config, &at, true).await;
            store.close().await;
            attached?;
            println!("migrations applied");
            Ok(())
        }
        Server::Admin(AdminCommand::RotateEncryptionKey, _) => {
            let at = backends::StoreAt::from_config(&config)?;
            let store = backends::open_existing_store(&at, &config).await?;
            let rotated = encryption::rotate(&store, &config, &at).await;
            store.close().await;
            println!("{}", rotated?);
            Ok(())
        }
        Server::Admin(AdminCommand::CreateKey { name, tenant, json }, _) => {
            let at = backends::StoreAt::from_config(&config)?;
            // A key in a store no server uses would be a lost key: never create one.
            let store = backends::open_existing_store(&at, &config).await?;
            store.migrate().await?;
            let created =
                keys::create_key(store.registry().as_ref(), &name, tenant.as_deref()).await;
            store.close().await;
            let created = created?;
            if json {
                let v = serde_json::json!({
                    "id": created.id.as_str(),
                    "name": name,
                    "tenant_id": tenant.unwrap_or_default(),
                    "token": created.token,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{created}");
            }
            Ok(())
        }
    }
}

/// The client flags as earlier versions took them, before the command
/// (`hookline --server X --token T --json tenants list`), moved after it, where they
/// are defined now (`hookline tenants --server X --token T --json list`).
fn client_flags_after_command(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const CLIENT_COMMANDS: [&str; 8] = [
        "publish",
        "events",
        "tenants",
        "subscriptions",
        "keys",
        "event-types",
        "deliveries",
        "tail",
    ];
    let mut end = 1;
    while let Some(arg) = args.get(end).and_then(|a| a.to_str()) {
        end += match arg {
            "--server" | "--token" => 2,
            "--json" | "--jsonl" => 1,
            a if a.starts_with("--server=") || a.starts_with("--token=") => 1,
            _ => break,
        };
    }
    let command = args.get(end).and_then(|a| a.to_str());
    if end > 1 && end < args.len() && command.is_some_and(|c| CLIENT_COMMANDS.contains(&c)) {
        let flags: Vec<_> = args.drain(1..end).collect();
        args.splice(2..2, flags);
    }
    args
}

/// A command that runs or administers an installation, with its settings.
enum Server {
    Serve(std::collections::BTreeSet<services::Service>, ServerArgs),
    Migrate(ServerArgs),
    Admin(AdminCommand, ServerArgs),
}

impl Server {
    fn args(&self) -> &ServerArgs {
        match self {
            Server::Serve(_, a) | Server::Migrate(a) | Server::Admin(_, a) => a,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and positional argument of every command says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "hookline", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }

    #[test]
    fn client_flags_before_the_command_still_work() {
        let args = |s: &str| {
            s.split(' ')
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
        };
        let moved = super::client_flags_after_command(args(
            "hookline --json --server h:1 --token=t tenants list",
        ));
        assert_eq!(
            moved,
            args("hookline tenants --json --server h:1 --token=t list")
        );
        let serve = args("hookline --json serve");
        assert_eq!(super::client_flags_after_command(serve.clone()), serve);
        let cli = <Cli as clap::Parser>::try_parse_from(super::client_flags_after_command(args(
            "hookline --server h:1 tenants list",
        )));
        assert!(cli.is_ok());
    }

    /// Server settings belong to the commands that run or administer an installation.
    #[test]
    fn client_commands_take_no_server_flags() {
        let mut cmd = Cli::command();
        cmd.build();
        for name in ["publish", "tenants", "subscriptions", "deliveries", "tail"] {
            let sub = cmd.find_subcommand(name).expect(name);
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                assert!(
                    !["database_url", "data_dir", "amqp_url", "config"].contains(&id),
                    "`hookline {name}` takes --{id}"
                );
            }
        }
        let admin = cmd.find_subcommand("admin").expect("admin");
        let create = admin.find_subcommand("create-key").expect("create-key");
        assert!(create.get_arguments().any(|a| a.get_id() == "data_dir"));
    }
}
