//! The client commands (`publish`, `events`, `tenants`, `subscriptions`, `keys`,
//! `event-types`, `deliveries`, and `tail` in its own module) talk to a running server
//! through `hookline-client`. This module holds what they share: where the server is,
//! the API key, the output format, and the pagination loop.

mod deliveries;
mod event_types;
mod events;
mod keys;
pub mod output;
mod subscriptions;
mod tenants;

use clap::Args;
pub use deliveries::{DeliveryCommand, deliveries, delivery_json, delivery_row};
pub use event_types::{EventTypeCommand, event_types};
pub use events::{EventCommand, PublishArgs, events, publish};
pub use keys::{KeyCommand, keys};
pub use subscriptions::{SubscriptionCommand, subscriptions};
pub use tenants::{TenantCommand, tenants};

pub use hookline_client::Client;
use output::Format;

/// Where the server is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// gRPC address of a Hookline server: `host:port` (as `serve` prints it),
    /// `http://host:port`, or `https://host:port` for TLS.
    #[arg(
        long,
        env = "HOOKLINE_SERVER",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// API key, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "HOOKLINE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print JSON: one object for one thing, an array for a list.
    #[arg(long, global = true, conflicts_with = "jsonl")]
    pub json: bool,
    /// Print JSON lines: one compact object per line.
    #[arg(long, global = true)]
    pub jsonl: bool,
}

/// What an `https://` server connection trusts and presents.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM CA certificates to trust for https:// instead of the public roots.
    #[arg(long, env = "HOOKLINE_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate for a server that requires one (mTLS).
    #[arg(
        long,
        env = "HOOKLINE_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        env = "HOOKLINE_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    pub client_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    pub fn options(&self) -> anyhow::Result<hookline_client::TlsOptions> {
        Ok(hookline_client::TlsOptions::from_files(
            self.ca.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )?)
    }
}

impl ClientArgs {
    pub fn format(&self) -> Format {
        match (self.json, self.jsonl) {
            (_, true) => Format::Jsonl,
            (true, false) => Format::Json,
            (false, false) => Format::Table,
        }
    }

    /// Connects to `--server` with `--token`.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let mut builder = Client::builder(self.server.clone()).tls(self.tls.options()?);
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        Ok(builder.connect().await?)
    }
}

/// A gRPC error as a one-line message (`NOT_FOUND: tenant ten_… not found`).
pub fn rpc(e: tonic::Status) -> anyhow::Error {
    hookline_client::Error::from(e).into()
}

/// Every item of a paged list: `page` gets a page token and answers the items and the
/// next token (empty on the last page).
pub async fn all_pages<T>(
    mut page: impl AsyncFnMut(String) -> anyhow::Result<(Vec<T>, String)>,
) -> anyhow::Result<Vec<T>> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// What a delete prints.
pub fn print_deleted(format: Format, what: &str, id: &str) {
    format.one(&serde_json::json!({ "deleted": id }), || {
        println!("deleted {what} {id}");
    });
}

/// The API key missing is a local mistake; say how to fix it before connecting.
pub fn request<T>(client: &Client, msg: T) -> anyhow::Result<tonic::Request<T>> {
    client.request(msg).map_err(|e| match e {
        hookline_client::Error::NoToken => anyhow::anyhow!(
            "no API key: pass --token or set HOOKLINE_TOKEN (create one with `hookline admin create-key`)"
        ),
        e => e.into(),
    })
}
